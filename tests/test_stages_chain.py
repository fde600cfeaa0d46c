"""The EFIN chain encoder -> projector -> llm through artifacts, with tiny components.

Checks what each stage trains (and that frozen weights do not move), the LLM handoff (LoRA
and draft weights reload to identical logits), that the recognizer rebuilt from an artifact
reproduces the stage's test transcripts, and the errors for a missing or mismatched artifact.
Also a draft distilled from the tiny target: it trains, exports, decodes, and moves towards the
target (KL down, agreement up) where the LM loss alone does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from efin.artifacts import ArtifactError, load_artifact
from efin.inference import load_recognizer
from efin.train import train
from tests.conftest import TRANSCRIPTS_LM, compose_config

TINY = ["data=tiny", "encoder=tiny", "projector=tiny", "~logger", "trainer.max_epochs=1",
        "trainer.limit_train_batches=3", "~callbacks.progress_bar", "~callbacks.lr_monitor"]


class Probe(Callback):
    """Records, per run, which parameters can train, which got gradients, which changed, and the
    train/eval mode of the frozen parts during training; keeps the final module."""

    runs: dict[str, dict] = {}

    def __init__(self, key: str):
        self.key = key
        self.record = Probe.runs.setdefault(key, {"grads": set(), "modes": set()})

    def on_train_start(self, trainer, module):
        self.record["trainable"] = {n for n, p in module.named_parameters() if p.requires_grad}
        self.record["before"] = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        model = getattr(module, "model", None)
        if hasattr(model, "llm"):
            self.record["modes"].add((model.encoder.training, model.llm.training, model.projector.training))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.record["grads"] |= {n for n, p in module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, module):
        before = self.record.pop("before")
        self.record["changed"] = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
        self.record["all"] = set(before)

    def on_test_end(self, trainer, module):
        self.record["module"] = module  # holds the best checkpoint's weights, as exported


def run_stage(root: Path, data_dir: Path, overrides: list[str]) -> dict:
    cfg = compose_config(TINY + overrides, root, data_dir)
    key = cfg.stage.run_name
    Probe.runs.pop(key, None)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.stage_dir) / "runs" / "test")
        cfg.callbacks.probe = {"_target_": f"{Probe.__module__}.{Probe.__qualname__}", "key": key}
    metrics = train(cfg)
    return {"metrics": metrics, "cfg": cfg, **Probe.runs[key]}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, shared_data_dir):
    root = tmp_path_factory.mktemp("chain")
    runs = {"encoder": run_stage(root, shared_data_dir, ["stage=encoder", TRANSCRIPTS_LM])}
    runs["projector_tiny"] = run_stage(root, shared_data_dir, ["stage=projector", "llm=tiny"])
    runs["llm_tiny"] = run_stage(root, shared_data_dir, ["stage=llm", "llm=tiny"])
    # the draft continues the tiny target's projector (conf/experiment/tiny_draft_projector.yaml)
    runs["projector_tiny_draft"] = run_stage(root, shared_data_dir, ["experiment=tiny_draft_projector"])
    runs["llm_tiny_draft"] = run_stage(root, shared_data_dir, ["stage=llm", "llm=tiny_draft"])
    return root, shared_data_dir, runs


def _artifact(root: Path, run: str) -> dict:
    return load_artifact(root / "outputs" / "default" / run / "artifact")


def _parts(names: set[str]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {"encoder": set(), "projector": set(), "llm": set()}
    for n in names:
        parts[n.split(".")[1]].add(n)
    return parts


def test_projector_stage_trains_only_the_projector(chain):
    _, _, runs = chain
    for llm in ("tiny", "tiny_draft"):
        run = runs[f"projector_{llm}"]
        parts = _parts(run["all"])
        assert run["trainable"] == parts["projector"]
        assert run["grads"] == parts["projector"]
        assert run["changed"] and run["changed"] <= parts["projector"]
        assert run["modes"] == {(False, False, True)}  # frozen encoder and LLM run in eval mode
        # no LLM generation at validation in stage 2 (the frozen LLM cannot read it yet): the projector's own WER
        assert run["metrics"]["val/wer/dev_ctc"] >= 0 and "test/wer/test" in run["metrics"]
        assert _artifact(chain[0], f"projector_{llm}")["llm"]["adapter"] == "frozen"


def test_llm_stage_trains_lora_and_projector_only(chain):
    _, _, runs = chain
    run = runs["llm_tiny"]
    parts = _parts(run["all"])
    lora = {n for n in parts["llm"] if "lora_" in n}
    assert lora and run["trainable"] == parts["projector"] | lora
    assert run["grads"] == run["trainable"]
    assert run["changed"] <= run["trainable"] and any("lora_B" in n for n in run["changed"])
    assert run["modes"] == {(False, True, True)}


def test_draft_llm_stage_trains_the_whole_draft(chain):
    root, _, runs = chain
    run = runs["llm_tiny_draft"]
    parts = _parts(run["all"])
    assert run["trainable"] == parts["projector"] | parts["llm"]
    assert not (run["changed"] & parts["encoder"])
    stored = _artifact(root, "llm_tiny_draft")["llm"]
    assert stored["adapter"] == "full"
    # the draft's vocabulary chosen on the training transcripts in stage 2 is carried through
    previous = _artifact(root, "projector_tiny_draft")["llm"]["weights"]["draft_head"]["vocab_ids"]
    assert torch.equal(stored["weights"]["full"]["vocab_ids"], previous)


def test_artifacts_carry_encoder_and_only_changed_llm_weights(chain):
    root, _, _ = chain
    encoder = _artifact(root, "encoder")["encoder"]["state_dict"]
    for run in ("projector_tiny", "llm_tiny", "projector_tiny_draft", "llm_tiny_draft"):
        art = _artifact(root, run)
        for k, v in encoder.items():  # the frozen encoder went through both stages unchanged
            assert torch.equal(art["encoder"]["state_dict"][k], v), (run, k)
        assert art["llm"]["spec"]["model"].get("texts") is None  # no runtime transcripts in the spec
    assert set(_artifact(root, "projector_tiny")["llm"]["weights"]) == set()
    lora = _artifact(root, "llm_tiny")["llm"]["weights"]
    assert set(lora) == {"lora"} and all("lora_" in k for k in lora["lora"])


@pytest.mark.parametrize("run", ["llm_tiny", "llm_tiny_draft"])
def test_reloaded_artifact_gives_identical_logits(chain, run):
    from efin.inference import speech_llm_from_artifact

    root, _, runs = chain
    trained = runs[run]["module"].model.eval()
    rebuilt = speech_llm_from_artifact(_artifact(root, run)).eval()
    feats, lens = torch.randn(2, 120, 80), torch.tensor([120, 90])
    ids = torch.randint(6, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained.llm(input_ids=ids).logits, rebuilt.llm(input_ids=ids).logits)
        a, b = trained(feats, lens, ["hello there", "a b"]), rebuilt(feats, lens, ["hello there", "a b"])
    assert torch.equal(a.loss, b.loss)
    # not vacuous: the LLM rebuilt without the stored weights differs
    from efin.models.llm_state import build_llm_from_spec

    stored = _artifact(root, run)["llm"]
    bare, _ = build_llm_from_spec(stored["spec"]["model"], stored["adapter"], stored["spec"]["lora"])
    with torch.no_grad():
        assert not torch.equal(bare.eval()(input_ids=ids).logits, rebuilt.llm(input_ids=ids).logits)


@pytest.mark.parametrize("run", ["projector_tiny", "llm_tiny", "llm_tiny_draft"])
def test_recognizer_reproduces_stage_transcripts(chain, run):
    from efin.evaluate import evaluate

    root, data_dir, runs = chain
    stage_hyps = Path(runs[run]["cfg"].paths.output_dir) / "decode" / "test.hyps.jsonl"
    expected = {r["id"]: r["hyp"] for r in map(json.loads, stage_hyps.read_text().splitlines())}
    out = root / "eval" / run
    data = runs[run]["cfg"].data
    # The same batches as the stage's test loop: an untrained tiny model has near-ties that the
    # float noise of another padding length could flip.
    cfg = compose_config(
        [f"artifact={root}/outputs/default/{run}/artifact", f"manifest={data_dir}/synthetic-tiny/test.jsonl",
         f"out_dir={out}", "num_workers=0", f"batch_seconds={data.val_max_batch_seconds}",
         f"num_buckets={data.num_buckets}"], root, data_dir, config_name="evaluate",
    )
    metrics = evaluate(cfg)
    got = {r["id"]: r["hyp"] for r in map(json.loads, (out / "test.hyps.jsonl").read_text().splitlines())}
    assert got == expected and len(got) == 8
    assert metrics["wer"] == pytest.approx(runs[run]["metrics"]["test/wer/test"])


def test_beam_option_reaches_the_recognizer(chain):
    root, _, _ = chain
    recognizer, featurizer = load_recognizer(root / "outputs" / "default" / "llm_tiny" / "artifact", num_beams=2)
    assert recognizer.options["num_beams"] == 2 and featurizer.config["n_mels"] == 80
    assert len(recognizer.transcribe(torch.randn(2, 50, 80), torch.tensor([50, 40]))) == 2


def test_encoder_word_lm_can_be_rebuilt_from_other_text_for_a_decoding(chain, tmp_path):
    root, _, _ = chain
    path = root / "outputs" / "default" / "encoder" / "artifact"
    stored = _artifact(root, "encoder")["ctc_lm"]
    assert stored["sources"] == ["transcripts"]
    text = tmp_path / "general.txt"
    text.write_text("zebras graze quietly\nthe zebra sleeps\n")
    recognizer, _ = load_recognizer(path, lm_sources=[str(text)])
    assert sorted(recognizer.lm_decoder.words) == ["graze", "quietly", "sleeps", "the", "zebra", "zebras"]
    feats, lens = torch.randn(2, 120, 80, generator=torch.Generator().manual_seed(0)), torch.tensor([120, 90])
    assert all(set(t.split()) <= {"graze", "quietly", "sleeps", "the", "zebra", "zebras"}
               for t in recognizer.transcribe(feats, lens))
    with pytest.raises(ValueError, match="training manifest"):
        load_recognizer(path, lm_sources=["transcripts"])


def test_rescoring_picks_the_llm_best_of_the_encoder_nbest(chain):
    from efin.inference import SpeechLLMRecognizer

    root, _, _ = chain
    encoder = _artifact(root, "encoder")
    for run in ("projector_tiny", "llm_tiny", "llm_tiny_draft"):  # carried on for rescoring
        assert _artifact(root, run)["ctc_lm"] == encoder["ctc_lm"]
    artifact = root / "outputs" / "default" / "llm_tiny" / "artifact"
    feats, lens = torch.randn(3, 150, 80, generator=torch.Generator().manual_seed(0)), torch.tensor([150, 120, 90])
    ctc, _ = load_recognizer(root / "outputs" / "default" / "encoder" / "artifact")
    # weight 0: the first pass alone, i.e. the encoder's own CTC + word LM transcripts
    first_only, _ = load_recognizer(artifact, rescore_nbest=8, rescore_weight=0.0)
    assert first_only.transcribe(feats, lens) == ctc.transcribe(feats, lens)
    # a huge weight: the candidate the LLM finds most likely
    rescoring, _ = load_recognizer(artifact, rescore_nbest=8, rescore_weight=1e6)
    with torch.no_grad():
        scored = rescoring.rescorer.scored_candidates(rescoring.model, feats, lens)
    assert [c[0][0] for c in scored] == ctc.transcribe(feats, lens)  # first-pass order
    assert max(len(c) for c in scored) > 1  # there is a choice to make
    assert rescoring.transcribe(feats, lens) == [max(c, key=lambda x: x[2])[0] for c in scored]
    # without the encoder stage's word LM there is nothing to rescore
    stored = _artifact(root, "llm_tiny")
    del stored["ctc_lm"]
    with pytest.raises(ArtifactError, match=r"lacks \['ctc_lm'\].*decode.rescore_nbest=0"):
        SpeechLLMRecognizer(stored, rescore_nbest=8)


def test_rescore_weight_sweep_starts_from_the_encoders_own_decoding(chain):
    from efin.evaluate import evaluate

    root, data_dir, _ = chain
    from efin.evaluate import rescore_sweep

    manifest = data_dir / "synthetic-tiny" / "test.jsonl"
    results = rescore_sweep(
        root / "outputs" / "default" / "llm_tiny" / "artifact", manifest, nbest=4, weights=[0.0, 1.0]
    )
    assert [r["weight"] for r in results["weights"]] == [0.0, 1.0] and results["utterances"] == 8
    # weight 0 is the encoder artifact's own CTC + word LM decoding (same batches as evaluate)
    cfg = compose_config(
        [
            f"artifact={root}/outputs/default/encoder/artifact",
            f"manifest={manifest}",
            f"out_dir={root / 'eval' / 'encoder_lm'}",
            "num_workers=0",
        ],
        root,
        data_dir,
        config_name="evaluate",
    )
    assert results["weights"][0]["wer"] == pytest.approx(evaluate(cfg)["wer"])
    assert results["oracle_wer"] <= min(r["wer"] for r in results["weights"])


def test_unfrozen_encoder_trains_and_drops_the_first_pass(chain):
    root, data_dir, _ = chain
    run = run_stage(root, data_dir, ["stage=llm", "llm=tiny", "name=unfrozen", "stage.module.train_encoder=true",
                                     f"init_from={root}/outputs/default/projector_tiny/artifact"])
    assert _parts(run["grads"])["encoder"] and _parts(run["changed"])["encoder"]
    artifact = load_artifact(root / "outputs" / "unfrozen" / "llm_tiny" / "artifact")
    # the encoder stage's CTC head and word LM no longer fit the fine-tuned encoder
    assert "ctc_head" not in artifact and "ctc_lm" not in artifact
    with pytest.raises(ArtifactError, match="decode.rescore_nbest=0"):
        load_recognizer(root / "outputs" / "unfrozen" / "llm_tiny" / "artifact", rescore_nbest=4)


def test_missing_artifact_names_the_command_to_run(tmp_path, shared_data_dir):
    cfg = compose_config(TINY + ["stage=llm", "llm=tiny", "name=fresh"], tmp_path, shared_data_dir)
    with pytest.raises(ArtifactError, match=r"python -m efin\.train stage=projector llm=tiny name=fresh"):
        train(cfg)


def test_encoder_and_llm_mismatch_errors(chain):
    root, data_dir, _ = chain
    cfg = compose_config(TINY + ["stage=projector", "llm=tiny", "encoder=small"], root, data_dir)
    with pytest.raises(ArtifactError, match="different encoder.*d_model: artifact 32 vs config 144"):
        train(cfg)
    projector = f"init_from={root}/outputs/default/projector_tiny/artifact"
    llm = f"init_from={root}/outputs/default/llm_tiny/artifact"
    cfg = compose_config(TINY + ["stage=llm", "llm=tiny", "llm.model.hidden_size=32", llm], root, data_dir)
    with pytest.raises(ArtifactError, match="different LLM"):
        train(cfg)
    # a CTC projector moves only to an LLM with the same token embeddings (a draft cut from it)
    cfg = compose_config(TINY + ["stage=projector", "llm=tiny", "llm.model.hidden_size=32", projector], root, data_dir)
    with pytest.raises(ArtifactError, match="width mismatch.*output_dim: artifact 64 vs this run 32"):
        train(cfg)
    cfg = compose_config(TINY + ["stage=projector", "llm=tiny", "llm.model.seed=1", projector], root, data_dir)
    with pytest.raises(ArtifactError, match="aligned to another LLM whose token embeddings differ"):
        train(cfg)


@pytest.mark.parametrize("run", ["llm_tiny", "llm_tiny_draft"])
def test_hf_export_reloads_to_same_transcripts(chain, run, tmp_path):
    from torch.utils.data import DataLoader

    from efin import export as export_hf
    from efin.data.dataset import SpeechDataset, collate
    from efin.data.manifest import load_manifest

    root, data_dir, _ = chain
    artifact = root / "outputs" / "default" / run / "artifact"
    out = export_hf.export(artifact, tmp_path / "export")
    assert (out / "llm" / "config.json").is_file() and (out / "projector.pt").is_file()
    assert not any("lora" in p.name for p in (out / "llm").iterdir())  # LoRA merged, no adapter files
    original, featurizer = load_recognizer(artifact)
    exported, _ = export_hf.load_export(out)
    utterances = load_manifest(data_dir / "synthetic-tiny" / "test.jsonl")
    batch = next(iter(DataLoader(SpeechDataset(utterances, featurizer), batch_size=8, collate_fn=collate)))
    assert exported.transcribe(batch["feats"], batch["feat_lens"]) == original.transcribe(
        batch["feats"], batch["feat_lens"]
    )
    # n-best rescoring too: the export carries the encoder's CTC head and word LM
    original, _ = load_recognizer(artifact, rescore_nbest=4)
    exported, _ = export_hf.load_export(out, rescore_nbest=4)
    assert exported.transcribe(batch["feats"], batch["feat_lens"]) == original.transcribe(
        batch["feats"], batch["feat_lens"]
    )


def _start(cfg, artifact: dict | None = None):
    from efin.handoff import SpeechLLMStart

    m = cfg.stage.module
    start = SpeechLLMStart(m.encoder, m.projector, m.llm, m.adapter)
    if artifact is not None:
        start.take(artifact)
    return start


def test_projector_width_mismatch_error(chain):
    root, data_dir, _ = chain
    artifact = _artifact(root, "projector_tiny")
    artifact["projector"]["config"]["output_dim"] = 32  # as if trained for a 32-wide LLM
    cfg = compose_config(TINY + ["stage=llm", "llm=tiny"], root, data_dir)
    with pytest.raises(ArtifactError, match="width mismatch.*output_dim: artifact 32 vs this run 64"):
        _start(cfg, artifact).build(artifact["features"])


def test_ctc_loss_weights_need_a_ctc_projector(chain):
    from efin.stages.speech_llm import check_loss_weights

    root, data_dir, _ = chain
    cfg = compose_config(TINY + ["stage=projector", "llm=tiny", "projector=tiny_mlp"], root, data_dir)
    encoder = _artifact(root, "encoder")
    start = _start(cfg, encoder)
    with pytest.raises(
        ArtifactError, match="different projector"
    ):  # the recipe's projector is checked against the artifact
        _start(cfg, _artifact(root, "projector_tiny")).build(encoder["features"])
    model = start.build(encoder["features"])
    m = cfg.stage.module
    with pytest.raises(ValueError, match="need a CTC projector.*set ctc_weight=0 and lm_weight=1"):
        check_loss_weights(model.projector, m.lm_weight, m.ctc_weight)
    check_loss_weights(model.projector, lm_weight=1, ctc_weight=0)  # the LM-loss recipe builds


# ---- speculative decoding as a decode option (evaluate, transcribe, export) ----------------------


def _evaluate(root: Path, data_dir: Path, run: str, out: str, extra: list[str]) -> tuple[dict, dict]:
    """Run efin.evaluate on the tiny test set; returns (metrics, {id: record})."""
    from efin.evaluate import evaluate

    out_dir = root / "eval" / out
    cfg = compose_config([f"stage_run={run}", f"manifest={data_dir}/synthetic-tiny/test.jsonl", f"out_dir={out_dir}",
                          "num_workers=0", *extra], root, data_dir, config_name="evaluate")
    metrics = evaluate(cfg)
    records = {r["id"]: r for r in map(json.loads, (out_dir / "test.hyps.jsonl").read_text().splitlines())}
    return metrics, records


@pytest.fixture(scope="module")
def greedy_tiny(chain):
    """llm_tiny's greedy transcripts, one utterance per batch (speculative decoding is unpadded)."""
    root, data_dir, _ = chain
    return _evaluate(root, data_dir, "llm_tiny", "greedy", ["decode=greedy", "batch_seconds=0.01"])


@pytest.mark.parametrize("draft", ["ctc", "llm_tiny_draft", "none"])
def test_speculative_evaluate_equals_greedy_and_writes_statistics(chain, greedy_tiny, draft):
    root, data_dir, _ = chain
    metrics, records = _evaluate(root, data_dir, "llm_tiny", f"spec_{draft}", [f"decode.speculative.draft={draft}"])
    _, greedy = greedy_tiny
    assert {k: r["hyp"] for k, r in records.items()} == {k: r["hyp"] for k, r in greedy.items()} and len(records) == 8
    for r in records.values():
        st = r["speculative"]
        assert st["target_forwards"] == len(st["accepted"]) == len(st["drafted"]) >= 1
        assert st["committed"] == sum(st["accepted"]) and all(a >= 1 for a in st["accepted"])
        assert all(d <= k for d, k in zip(st["accepted_draft"], st["drafted"]))
        assert (st["draft_forwards"] > 0) == (draft == "llm_tiny_draft")  # the CTC draft costs no draft forward
    summary = metrics["speculative"]
    model_draft = str(root / "outputs/default/llm_tiny_draft/artifact")
    assert summary["config"]["draft"] == (model_draft if draft == "llm_tiny_draft" else draft)
    assert summary["config"]["max_draft"] == {"ctc": 64, "llm_tiny_draft": 4, "none": 0}[draft]  # null: per draft kind
    if draft == "none":  # autoregressive greedy in the same harness: one token per target forward
        assert summary["mean_accepted_length"] == 1.0 and summary["target_forwards"] == summary["committed_tokens"]
    assert summary["mean_accepted_length_includes_bonus"] and summary["utterances"] == 8
    assert summary["committed_tokens"] == sum(r["speculative"]["committed"] for r in records.values())
    assert summary["target_forwards"] == sum(r["speculative"]["target_forwards"] for r in records.values())
    assert summary["mean_accepted_length"] >= 1.0 and 0.0 <= summary["acceptance_rate"] <= 1.0
    assert {"encoder_s", "prefill_s", "draft_s", "verify_s"} <= set(summary)
    saved = json.loads((root / "eval" / f"spec_{draft}" / "test.metrics.json").read_text())
    assert saved["speculative"]["target_forwards"] == summary["target_forwards"]


def test_speculative_option_errors(chain):
    root, data_dir, _ = chain
    with pytest.raises(
        ArtifactError, match=r"No draft artifact .*llm_nope.*python -m efin\.train stage=llm llm=nope name=default"
    ):
        _evaluate(root, data_dir, "llm_tiny", "err", ["decode.speculative.draft=llm_nope"])
    # the draft is looked up in this experiment (name=); a draft's projector stage has its recipe
    with pytest.raises(
        ArtifactError, match=r"outputs/other/projector_tiny_draft.*experiment=tiny_draft_projector name=other"
    ):
        _evaluate(root, data_dir, "llm_tiny", "err", ["decode.speculative.draft=projector_tiny_draft", "name=other"])
    with pytest.raises(ValueError, match="encoder artifact.*needs a projector or llm artifact"):
        _evaluate(root, data_dir, "encoder", "err", ["decode.speculative.draft=ctc"])
    with pytest.raises(ValueError, match="not beam search"):
        _evaluate(root, data_dir, "llm_tiny", "err", ["decode=beam", "decode.speculative.draft=ctc"])
    with pytest.raises(ValueError, match="n-best rescoring"):
        _evaluate(root, data_dir, "llm_tiny", "err", ["decode=rescore", "decode.speculative.draft=ctc"])
    with pytest.raises(ArtifactError, match="'encoder' artifact.*a draft is a projector or llm stage artifact"):
        _evaluate(root, data_dir, "llm_tiny", "err", ["decode.speculative.draft=encoder"])
    # an artifact path works like a stage run name
    recognizer, _ = load_recognizer(root / "outputs/default/llm_tiny/artifact", speculative={
        "draft": str(root / "outputs/default/llm_tiny_draft/artifact"), "max_draft": 3})
    assert recognizer.speculative.drafter.share_encoder  # frozen encoder: equal weights, one copy
    assert recognizer.speculative.drafter.draft.encoder is recognizer.model.encoder


def _transcribe_cli(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    """Run ``python -m efin.transcribe ARGS`` in this process: (exit code, stdout, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from efin import transcribe

    GlobalHydra.instance().clear()
    monkeypatch.setattr("sys.argv", ["efin.transcribe", *args])
    code = 0
    try:
        transcribe.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("run", ["llm_tiny", "encoder"])
def test_transcribe_prints_one_line_per_file_equal_to_evaluate(chain, greedy_tiny, run, monkeypatch, capsys, caplog):
    from efin.data.manifest import load_manifest
    from efin.text import normalize

    root, data_dir, _ = chain
    caplog.set_level("INFO", logger="efin")
    utts = load_manifest(data_dir / "synthetic-tiny" / "test.jsonl")[:3]
    assert all(u.offset == 0 for u in utts)  # whole files, as transcribe reads them
    files = [u.audio_filepath for u in utts]
    args = [f"artifact={root}/outputs/default/{run}/artifact", "audio=" + ",".join(str(f) for f in files),
            f"paths.root_dir={root}"]
    code, out, err = _transcribe_cli(monkeypatch, capsys, args)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(f) for f in files]
    if run == "llm_tiny":  # speculative with the CTC draft by default; greedy's transcripts
        expected = {k: r["hyp"] for k, r in greedy_tiny[1].items()}
        assert "speculative (draft ctc)" in caplog.text  # the summary (stderr on the command line)
    else:  # the encoder's CTC + word LM, as evaluate decodes it
        expected = {k: r["hyp"] for k, r in _evaluate(root, data_dir, "encoder", "encoder_lm_t", [])[1].items()}
    assert [normalize(line.split("\t", 1)[1]) for line in lines] == [expected[u.id] for u in utts]


def test_transcribe_bad_input_names_the_file(chain, tmp_path, monkeypatch, capsys):
    root, data_dir, _ = chain
    artifact = f"artifact={root}/outputs/default/llm_tiny/artifact"
    code, out, err = _transcribe_cli(monkeypatch, capsys, [artifact, f"audio={tmp_path}/missing.wav"])
    assert code == 1 and out == "" and f"audio file not found: {tmp_path}/missing.wav" in err
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"not audio at all")
    code, out, err = _transcribe_cli(monkeypatch, capsys, [artifact, f"audio={bad}"])
    assert code == 1 and f"unreadable audio file {bad}" in err and len(err.strip().splitlines()) == 1
    wav = next((data_dir / "synthetic-tiny").rglob("*.flac"), None) or next(
        (data_dir / "synthetic-tiny").rglob("*.wav")
    )
    code, out, err = _transcribe_cli(monkeypatch, capsys, [f"artifact={tmp_path}/nowhere", f"audio={wav}"])
    assert code == 1 and f"no efin artifact at {tmp_path}/nowhere" in err
    code, out, err = _transcribe_cli(
        monkeypatch, capsys, [f"artifact={tmp_path}", f"audio={wav}"]
    )  # a directory, no artifact
    assert code == 1 and f"artifact={tmp_path}: No stage artifact at {tmp_path}" in err


def test_hf_export_decodes_speculatively_with_the_ctc_draft(chain, tmp_path):
    from efin import export as export_hf

    root, _, _ = chain
    artifact = root / "outputs" / "default" / "llm_tiny" / "artifact"
    out = export_hf.export(artifact, tmp_path / "export")
    feats, lens = torch.randn(3, 150, 80, generator=torch.Generator().manual_seed(0)), torch.tensor([150, 120, 90])
    greedy, _ = export_hf.load_export(out)
    speculative, _ = export_hf.load_export(out, speculative={"draft": "ctc"})
    assert speculative.speculative.drafter.name == "ctc"
    expected = [greedy.transcribe(feats[i : i + 1, : lens[i]], lens[i : i + 1])[0] for i in range(3)]
    assert speculative.transcribe(feats, lens) == expected and len(speculative.last_stats) == 3
    # a trained draft is its own export
    draft = export_hf.export(root / "outputs" / "default" / "llm_tiny_draft" / "artifact", tmp_path / "draft")
    with_draft, _ = export_hf.load_export(out, speculative={"draft": str(draft), "max_draft": 3})
    assert with_draft.transcribe(feats, lens) == expected
    assert sum(s.draft_forwards for s in with_draft.last_stats) > 0
    # efin.transcribe takes an export directory too: the CTC draft by default (auto)
    from efin.transcribe import load_model

    recognizer, _ = load_model(out, "cpu", {"speculative": {"draft": "auto"}})
    assert recognizer.speculative.drafter.name == "ctc"

# ---- drafts distilled from their target (efin.stages.distill) --------------------------------


@pytest.fixture(scope="module")
def distilled(chain):
    """The tiny draft distilled from llm_tiny (the recipe), and a plain draft run that only
    measures its agreement with the target (weight 0); both start where llm_tiny_draft did."""
    root, data_dir, runs = chain
    runs["llm_tiny_draft_distill"] = run_stage(root, data_dir, ["experiment=tiny_draft_distill"])
    runs["llm_tiny_draft_measure"] = run_stage(root, data_dir, [
        "stage=llm", "llm=tiny_draft", "stage.run_name=llm_tiny_draft_measure",
        "stage.module.distill.target=llm_tiny", "stage.module.distill.weight=0"])
    return root, data_dir, runs


def _dev_agreement(root: Path, data_dir: Path, draft_run: str) -> dict:
    """Teacher-forced KL(target || draft) over the draft's head and argmax agreement with llm_tiny
    on the whole dev set (one batch), from the artifacts; also the target's logits both ways."""
    from efin.data.dataset import SpeechDataset, collate
    from efin.data.manifest import load_manifest
    from efin.inference import load_recognizer, speech_llm_from_artifact
    from efin.stages.distill import DistillTarget, agreement, subset_kl

    artifact = _artifact(root, draft_run)
    draft = speech_llm_from_artifact(artifact).eval()
    target = DistillTarget.build(_artifact(root, "llm_tiny"), draft, artifact["features"], train_encoder=False)
    _, featurizer = load_recognizer(root / "outputs" / "default" / draft_run / "artifact")
    batch = collate(
        [SpeechDataset(load_manifest(data_dir / "synthetic-tiny" / "dev.jsonl"), featurizer)[i] for i in range(8)]
    )
    with torch.no_grad():
        out = draft(batch["feats"], batch["feat_lens"], batch["texts"])
        teacher = target.label_logits(out, batch["feats"], batch["feat_lens"])
        target.share_encoder = not target.share_encoder
        other = target.label_logits(out, batch["feats"], batch["feat_lens"])
        scored = out.label_logits
        return {"kl": subset_kl(teacher, scored.logits, scored.vocab_ids).item(),
                "agree": agreement(teacher, scored).float().mean().item(), "positions": scored.labels.numel(),
                "shared": not target.share_encoder, "teacher": teacher, "teacher_own_encoder": other}


def test_distilled_draft_trains_exports_decodes_and_moves_towards_the_target(distilled):
    root, data_dir, runs = distilled
    run = runs["llm_tiny_draft_distill"]
    for key in ("train/agree", "train/distill_loss", "val/agree/dev", "val/distill_loss/dev", "test/agree/test"):
        assert key in run["metrics"], key
    assert 0.0 <= run["metrics"]["val/agree/dev"] <= 1.0
    parts = _parts(run["all"])
    assert run["trainable"] == parts["projector"] | parts["llm"]  # the target trains nothing and is no parameter here
    assert run["changed"] and not (run["changed"] & parts["encoder"])
    # the artifact holds the draft only: the same entries as the plain draft's, no target weights
    art, plain_art = _artifact(root, "llm_tiny_draft_distill"), _artifact(root, "llm_tiny_draft")
    assert set(art) == set(plain_art) and set(art["llm"]["weights"]["full"]) == set(plain_art["llm"]["weights"]["full"])
    assert art["llm"]["spec"]["tag"] == "tiny_draft"
    recognizer, _ = load_recognizer(root / "outputs" / "default" / "llm_tiny_draft_distill" / "artifact")
    assert len(recognizer.transcribe(torch.randn(2, 120, 80), torch.tensor([120, 90]))) == 2

    start = _dev_agreement(root, data_dir, "projector_tiny_draft")
    lm_only = _dev_agreement(root, data_dir, "llm_tiny_draft")  # same start, seed and batches, LM loss alone
    kd = _dev_agreement(root, data_dir, "llm_tiny_draft_distill")
    # equal encoders: the target reads the draft's encoder output, and gets the same logits as with its own
    assert kd["shared"] and torch.allclose(kd["teacher"], kd["teacher_own_encoder"], atol=1e-5)
    assert kd["positions"] > 100
    assert kd["kl"] < 0.9 * start["kl"] and kd["kl"] < 0.9 * lm_only["kl"]
    assert kd["agree"] > lm_only["agree"]


def test_weight_zero_measures_agreement_without_changing_training(distilled):
    root, _, runs = distilled
    measured = runs["llm_tiny_draft_measure"]["metrics"]
    assert 0.0 <= measured["val/agree/dev"] <= 1.0 and "train/agree" in measured
    # the LM loss alone trained it: the same weights as the plain draft run
    a = _artifact(root, "llm_tiny_draft_measure")["llm"]["weights"]["full"]
    b = _artifact(root, "llm_tiny_draft")["llm"]["weights"]["full"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert measured["val/wer/dev"] == pytest.approx(runs["llm_tiny_draft"]["metrics"]["val/wer/dev"])


def test_missing_distill_target_names_the_command(chain):
    root, data_dir, _ = chain
    cfg = compose_config(TINY + ["experiment=tiny_draft_distill", "name=fresh",
                                 f"init_from={root}/outputs/default/projector_tiny_draft/artifact"], root, data_dir)
    with pytest.raises(ArtifactError, match=r"python -m efin\.train stage=llm llm=tiny name=fresh"):
        train(cfg)


def test_distill_target_with_another_tokenizer_is_refused(chain):
    from efin.inference import speech_llm_from_artifact
    from efin.models.llm import build_tiny_tokenizer
    from efin.stages.distill import DistillTarget

    root, _, _ = chain
    artifact = _artifact(root, "llm_tiny_draft")
    draft = speech_llm_from_artifact(artifact)
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra>"])
    draft.tokenizer = other
    with pytest.raises(ArtifactError, match=r"different tokenizers \(target vs draft: 102 vs 103 tokens\)"):
        DistillTarget.build(_artifact(root, "llm_tiny"), draft, artifact["features"], train_encoder=False)
