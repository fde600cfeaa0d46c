"""Run the whole EFIN chain for the target LLM and its draft, then score every artifact on test.

    python -m efin.pipeline budget=quickstart      # the whole chain in about 15 min on 2 CPU cores (a first look)
    python -m efin.pipeline                        # (= scripts/run_pipeline.py) the default chain: a Whisper
                                                   # encoder fine-tuned with CTC, then the SmolLM2 target and
                                                   # its draft reading its transcript (README Results: its time)
    python -m efin.pipeline --chain projector      # the Conformer encoder from scratch, then projector + llm
                                                   # for smollm2 and smollm2_draft (the LLMs read its embeddings)
    python -m efin.pipeline name=exp1 trainer=gpu  # extra Hydra overrides go to every stage
    python -m efin.pipeline --chain projector --llms tiny,tiny_draft name=smoke data=tiny encoder=tiny projector=tiny
                                                   # a smoke test of the chain in about a minute
    python -m efin.pipeline --eval-only name=exp1  # only evaluate the artifacts already trained

Each step is an ordinary ``python -m efin.train ...`` run (its own process, run dir and
artifact under outputs/<name>/), so a failed step can be re-run alone with the printed command;
``--skip-encoder`` reuses an existing encoder artifact. The default chain's steps are recipes
(conf/experiment/whisper_ctc.yaml, transcript_llm.yaml, transcript_draft_distill.yaml); in the
projector chain a draft LLM's stages use its recipes when they exist
(conf/experiment/<llm>_projector.yaml, <llm>_distill.yaml: trained to agree with the target).
Afterwards ``python -m efin.evaluate`` decodes every test set with each artifact (encoder with its
word LM and greedy, every projector and llm; the target's llm also with joint CTC/LLM decoding
and rescoring the encoder's n-best) into outputs/<name>/eval/<run>/ and the WER/CER table is
printed and written to outputs/<name>/pipeline_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from efin.data.datamodule import named_test_sets

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
CHAINS = ("transcript", "projector")  # --chain: chain_of()


def compose(overrides: list[str]):
    """The train config these overrides give (as ``python -m efin.train`` would compose it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


@dataclass
class Chain:
    """What ``--chain`` trains and how its artifacts are decoded.

    steps: the training steps in order, each its own options (the encoder's first).
    every_step: options every training step takes (evaluations read them from the artifacts).
    llm_decoding: decoding options of every LLM artifact's evaluations.
    """

    steps: list[list[str]]
    every_step: list[str] = field(default_factory=list)
    llm_decoding: list[str] = field(default_factory=list)


def chain_of(name: str, llms: list[str]) -> Chain:
    """The chain ``--chain name`` runs; ``llms`` (target first, then drafts) for the projector chain."""
    if name == "transcript":
        # A pretrained Whisper encoder fine-tuned with CTC; the target and its draft read the CTC's
        # transcript as text (projector=transcript: the LLM's own embeddings, nothing to align, so
        # no projector stage), and decode reading its CTC + word LM decoding (README Results).
        return Chain(
            steps=[["experiment=whisper_ctc"], ["experiment=transcript_llm"], ["experiment=transcript_draft_distill"]],
            every_step=["encoder=hf"],
            llm_decoding=["decode.transcript_decoding=lm"],
        )
    steps = [["stage=encoder"]]
    for llm in llms:
        # Recipes of its own for this LLM's stages, when there are: a draft continues its
        # target's projector, and its stage llm learns to agree with the target (distillation).
        for stage, recipe in (("projector", f"{llm}_projector"), ("llm", f"{llm}_distill")):
            own = (CONF_DIR / "experiment" / f"{recipe}.yaml").is_file()
            steps.append([f"experiment={recipe}"] if own else [f"stage={stage}", f"llm={llm}"])
    return Chain(steps)


def plan(chain: Chain, overrides: list[str], skip_encoder: bool) -> list[dict]:
    """Ordered steps: {run, train (argv) or None, artifact, evals: {test set: argv}, metrics: {test set: path}}."""
    python = [sys.executable, "-m"]
    steps = []
    target_llm = None  # the first stage llm's run: the target
    for i, stage in enumerate(chain.steps):
        options = stage + chain.every_step + overrides
        cfg = compose(options)
        run = cfg.stage.run_name
        is_encoder = cfg.stage.name == "encoder"
        if target_llm is None and cfg.stage.name == "llm":
            target_llm = run
        exp_dir, artifact = cfg.paths.exp_dir, f"{cfg.paths.stage_dir}/artifact"
        passthrough = [
            o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("name",) or o.lstrip("+~").startswith("paths.")
        ]
        test_sets = named_test_sets(cfg.data.test)
        only = OmegaConf.select(cfg, "pipeline.test_sets")  # a budget may score fewer test sets
        if only:
            test_sets = {k: v for k, v in test_sets.items() if k in only}
        # The CTC baseline twice: with its word LM (the artifact's default) and greedy; the
        # target's stage llm three times: generating, joint CTC/LLM decoding, and rescoring the
        # CTC + word LM n-best.
        variants = {run: []}
        if is_encoder:
            variants["encoder_greedy"] = ["decode=ctc_greedy"]
        elif run == target_llm:
            variants[f"{run}_joint"] = ["decode=joint"]
            variants[f"{run}_rescore"] = ["decode=rescore"]
        limit = OmegaConf.select(cfg, "pipeline.eval_limit")  # a budget's quick look (conf/budget/)
        for label, extra in variants.items():
            decoding = extra if is_encoder else [*extra, *chain.llm_decoding]
            steps.append(
                {
                    "run": label,
                    # the evaluations below decode the test sets: no test pass in training
                    "train": python + ["efin.train", *options, "test_after_fit=false"]
                    if not extra and not (i == 0 and skip_encoder)
                    else None,
                    "artifact": artifact,
                    "evals": {
                        name: python
                        + [
                            "efin.evaluate",
                            f"artifact={artifact}",
                            f"manifest={manifest}",
                            f"split={name}",
                            f"hydra.run.dir={exp_dir}/eval/{label}",
                            *([f"limit={limit}"] if limit else []),
                            *passthrough,
                            *decoding,
                        ]
                        for name, manifest in test_sets.items()
                    },
                    "metrics": {name: f"{exp_dir}/eval/{label}/{name}.metrics.json" for name in test_sets},
                    "exp_dir": exp_dir,
                }
            )
    return steps


def run(argv: list[str]) -> None:
    print("+ " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    # efin importable from this checkout even when it is not pip-installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run(argv, check=True, env=env)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--chain",
        choices=CHAINS,
        default="transcript",
        help="transcript (default): Whisper encoder, LLMs reading its CTC transcript; projector: Conformer encoder, "
        "token-CTC projector stage, LLMs reading its embeddings",
    )
    parser.add_argument(
        "--llms",
        default=None,
        help="--chain projector: comma-separated llm options to train projector + llm stages for (target first, then "
        "drafts; default smollm2,smollm2_draft)",
    )
    parser.add_argument("--skip-encoder", action="store_true", help="reuse outputs/<name>/encoder/artifact")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the artifacts already trained")
    args, overrides = parser.parse_known_args()
    bad = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("stage", "llm")]
    if bad:
        parser.error(f"{bad}: the pipeline sets stage= and llm= itself; use --llms for the LLMs")
    if args.llms is not None and args.chain != "projector":
        parser.error("--llms chooses the LLMs of --chain projector; the transcript chain trains smollm2 and its draft")
    llms = [x for x in (args.llms or "smollm2,smollm2_draft").split(",") if x]
    steps = plan(chain_of(args.chain, llms), overrides, args.skip_encoder)
    for step in steps:
        if step["train"] and not args.eval_only:
            print("+ " + shlex.join(step["train"])) if args.dry_run else run(step["train"])
    for step in steps:
        for argv in step["evals"].values():
            print("+ " + shlex.join(argv)) if args.dry_run else run(argv)
    if args.dry_run:
        return
    rows = {s["run"]: {name: json.loads(Path(p).read_text()) for name, p in s["metrics"].items()} for s in steps}
    width = max(len(run_name) for run_name in rows) + 2
    print(f"\n{'artifact':<{width}}{'test set':<14}{'WER %':>8}{'CER %':>8}{'RTF':>8}")
    for run_name, sets in rows.items():
        for name, m in sets.items():
            wer, cer, rtf = 100 * m["wer"], 100 * m["cer"], m["real_time_factor"]
            print(f"{run_name:<{width}}{name:<14}{wer:>8.2f}{cer:>8.2f}{rtf:>8.3f}")
    out = Path(steps[0]["exp_dir"]) / "pipeline_results.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
