"""Run the whole EFIN chain for the target LLM and its draft, then score every artifact on test.

    python -m efin.pipeline budget=quickstart      # the whole chain in 10-20 min on 2 CPU cores (a first look)
    python -m efin.pipeline                        # (= scripts/run_pipeline.py) defaults: encoder once, then
                                                   # projector + llm for smollm2 and smollm2_draft (see README
                                                   # Results for its time)
    python -m efin.pipeline name=exp1 trainer=gpu  # extra Hydra overrides go to every stage
    python -m efin.pipeline --llms tiny,tiny_draft name=smoke data=tiny encoder=tiny projector=tiny
                                                   # a smoke test of the chain in about a minute
    python -m efin.pipeline --eval-only name=exp1  # only evaluate the artifacts already trained

Each step is an ordinary ``python -m efin.train stage=...`` run (its own process, run dir and
artifact under outputs/<name>/), so a failed step can be re-run alone with the printed command;
``--skip-encoder`` reuses an existing encoder artifact. A draft LLM's stages use its recipes
when they exist (conf/experiment/<llm>_projector.yaml, <llm>_distill.yaml: trained to agree with
the target). Afterwards ``python -m efin.evaluate`` decodes every test set with each artifact
(encoder with its word LM and greedy, projector_<llm>, llm_<llm>; the target's llm also with
joint CTC/LLM decoding and rescoring the encoder's n-best) into
outputs/<name>/eval/<run>/ and the WER/CER table is printed and written to
outputs/<name>/pipeline_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from efin.data.datamodule import named_test_sets

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"



def compose(overrides: list[str]):
    """The train config these overrides give (as ``python -m efin.train`` would compose it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def plan(llms: list[str], overrides: list[str], skip_encoder: bool) -> list[dict]:
    """Ordered steps: {run, train (argv) or None, artifact, evals: {test set: argv}, metrics: {test set: path}}."""
    stages = [] if skip_encoder else [["stage=encoder"]]
    for llm in llms:
        # Recipes of its own for this LLM's stages, when there are: a draft continues its
        # target's projector, and its stage llm learns to agree with the target (distillation).
        for stage, recipe in (("projector", f"{llm}_projector"), ("llm", f"{llm}_distill")):
            own = (CONF_DIR / "experiment" / f"{recipe}.yaml").is_file()
            stages.append([f"experiment={recipe}"] if own else [f"stage={stage}", f"llm={llm}"])
    evaluated = [["stage=encoder"]] + stages[0 if skip_encoder else 1 :]
    target_llm = f"llm_{llms[0]}" if llms else None
    python = [sys.executable, "-m"]
    steps = []
    for stage in evaluated:
        cfg = compose(stage + overrides)
        run = cfg.stage.run_name
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
        if run == "encoder":
            variants["encoder_greedy"] = ["decode=ctc_greedy"]
        elif run == target_llm:
            variants[f"{run}_joint"] = ["decode=joint"]
            variants[f"{run}_rescore"] = ["decode=rescore"]
        limit = OmegaConf.select(cfg, "pipeline.eval_limit")  # a budget's quick look (conf/budget/)
        for label, extra in variants.items():
            steps.append(
                {
                    "run": label,
                    # the evaluations below decode the test sets: no test pass in training
                    "train": python + ["efin.train", *stage, *overrides, "test_after_fit=false"]
                    if stage in stages and not extra
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
                            *extra,
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
        "--llms",
        default="smollm2,smollm2_draft",
        help="comma-separated llm options to train projector + llm stages for (target first, then drafts)",
    )
    parser.add_argument("--skip-encoder", action="store_true", help="reuse outputs/<name>/encoder/artifact")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the artifacts already trained")
    args, overrides = parser.parse_known_args()
    bad = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("stage", "llm")]
    if bad:
        parser.error(f"{bad}: the pipeline sets stage= and llm= itself; use --llms for the LLMs")
    steps = plan([x for x in args.llms.split(",") if x], overrides, args.skip_encoder)
    for step in steps:
        if step["train"] and not args.eval_only:
            print("+ " + shlex.join(step["train"])) if args.dry_run else run(step["train"])
    for step in steps:
        for argv in step["evals"].values():
            print("+ " + shlex.join(argv)) if args.dry_run else run(argv)
    if args.dry_run:
        return
    rows = {s["run"]: {name: json.loads(Path(p).read_text()) for name, p in s["metrics"].items()} for s in steps}
    print(f"\n{'artifact':<28}{'test set':<14}{'WER %':>8}{'CER %':>8}{'RTF':>8}")
    for run_name, sets in rows.items():
        for name, m in sets.items():
            print(f"{run_name:<28}{name:<14}{100 * m['wer']:>8.2f}{100 * m['cer']:>8.2f}{m['real_time_factor']:>8.3f}")
    out = Path(steps[0]["exp_dir"]) / "pipeline_results.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
