"""`evaluate.py --sweep` end to end on a tiny trained workdir."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_writes_table_figures_and_points(tiny_workdir, image_folder, decode_cache,
                                               tmp_path):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "evaluate.py", "--sweep", "--workdir", str(tiny_workdir),
                        "--out", str(out), "--data-dir", str(image_folder),
                        "--cache-dir", str(decode_cache), "--batch-size", "8",
                        "--repeats", "1", "--timing-images", "8", "--single-images", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("table2.md", "pr.png", "roc.png", "acc_vs_time.png", "gallery.png",
                 "sweep.csv", "sweep.json"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "sweep.json").read_text())
    rules = {p["rule"] for p in result["points"]}
    assert rules == {"expert", "aux5b", "max_softmax", "entropy", "oracle"}
    for row in result["table2"]:
        # The real cascade's test accuracy equals the one computed from the exit outputs.
        assert abs(row["accuracy"] - row["accuracy_from_outputs"]) < 1e-9
    table = (out / "table2.md").read_text()
    assert "Inception v3 O2 only" in table and "| Method |" in table
    timed = [p for p in result["points"] if "ms_batch" in p]
    assert timed and all(p["ms_batch"] > 0 for p in timed)
