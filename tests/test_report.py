"""`evaluate.py --sweep` end to end on a tiny trained workdir."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_writes_table_figures_and_points(tiny_workdir, tiny_ablation, image_folder,
                                               decode_cache, tmp_path):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "evaluate.py", "--sweep", "--workdir", str(tiny_workdir),
                        "--ablation", str(tiny_ablation),
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
    # The ablation's expert (O1's softmax only, trained on the same backbone) is a rule of
    # the same sweep: swept, calibrated and timed like the others.
    assert rules == {"expert", "aux5b", "max_softmax", "entropy", "oracle", "expert:paper"}
    assert any(p["rule"] == "expert:paper" and "ms_batch" in p for p in result["points"])
    assert {r["rule"] for r in result["table2"]} <= rules - {"oracle"}
    for row in result["table2"]:
        # The real cascade's test accuracy equals the one computed from the exit outputs.
        assert abs(row["accuracy"] - row["accuracy_from_outputs"]) < 1e-9
    table = (out / "table2.md").read_text()
    assert "Inception v3 O2 only" in table and "| Method |" in table
    if any(r["rule"] == "expert:paper" for r in result["table2"]):
        assert "| Proposed Expert, inputs paper (ablation) |" in table
    timed = [p for p in result["points"] if "ms_batch" in p]
    assert timed and all(p["ms_batch"] > 0 for p in timed)
    for row in result["table2"]:
        assert row["ms_single_p50"] <= row["ms_single_p95"]
        assert row["time_saving_min"] <= row["time_saving"] <= row["time_saving_max"]
        assert row["executed_flops"] >= row["flops"] - 1e-6  # padding only adds
        assert "routing_overhead" in row and "fixed_overhead" in row
        # Certified by default (alpha 0.1): the bound met the target on the calibration split.
        assert row["alpha"] == 0.1 and row["drop_ucb"] <= row["target_drop"] + 1e-12
        assert 0.0 <= row["within_target"] <= 1.0
    assert "within target (test bootstrap)" in table and "alpha 0.1" in table
    # the sweep is also a set of TensorBoard curves, one step per threshold
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    n_expert = sum(p["rule"] == "expert" for p in result["points"])
    assert len(acc.Tensors("sweep/expert/accuracy")) == n_expert
    assert "sweep/oracle/flops_saving" in acc.Tags()["tensors"]
    # bench/early_exit.py reads the same sweep.json into its ratios.
    r = subprocess.run([sys.executable, "bench/early_exit.py", str(out / "sweep.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "measured/FLOPs-predicted time over" in r.stdout, r.stderr


def test_an_ablation_on_another_backbone_is_refused():
    from cnneb_jax.report import same_backbone
    out = {"exits": [np.zeros((4, 10)), np.ones((4, 10))]}
    same_backbone(out, {"exits": [np.zeros((4, 10)), np.ones((4, 10)) + 1e-6]}, "a")
    with pytest.raises(ValueError, match="does not share the backbone: O2"):
        same_backbone(out, {"exits": [np.zeros((4, 10)), np.ones((4, 10)) * 2]}, "a")


def _fake_cascade(buckets=(1, 2, 4, 8, 16)):
    from cnneb_jax.programs import Cascade
    flops = {"seg:a": 10.0, "seg:b": 100.0, "head:O1": 1.0, "head:O2": 0.0, "expert:E1": 2.0,
             "aux5b:E1": 5.0}
    return Cascade(None, None, {}, buckets, flops)


def test_executed_flops_count_the_rows_run():
    from cnneb_jax.report import executed_flops
    c = _fake_cascade()
    # 16 images ran the first program; 5 went deep, run as a bucket of 8.
    assert executed_flops(c, np.array([16, 8]), 16, "expert") == pytest.approx(
        (16 * (10 + 1 + 2) + 8 * 100) / 16)
    assert executed_flops(c, np.array([16, 8]), 16, "max_softmax") == pytest.approx(
        (16 * 11 + 8 * 100) / 16)
    # Padding of the first program counts too (20 images as 16 + a bucket of 4).
    assert executed_flops(c, np.array([20, 0]), 18, "max_softmax") == pytest.approx(
        20 * 11 / 18)


def test_stratified_subset_keeps_the_exit_shares():
    from cnneb_jax.timing import stratified
    exits = np.array([0] * 815 + [1] * 185)
    idx = stratified(exits, 50, seed=3)
    assert len(idx) == len(set(idx)) == 50
    assert (exits[idx] == 1).sum() == 9  # 18.5% of 50, rounded by largest remainder
    assert not np.array_equal(np.sort(idx), np.arange(50))  # drawn, not the first 50


def test_evaluate_refuses_an_alpha_outside_0_1(capsys):
    sys.path.insert(0, str(ROOT))
    import evaluate
    assert evaluate.main(["--workdir", "nowhere", "--sweep", "--alpha", "1.5"]) == 1
    assert "--alpha must be in [0, 1)" in capsys.readouterr().err


def test_evaluate_without_sweep_prints_accuracies_and_the_self_report(
        tiny_workdir, tiny_cfg, image_folder, decode_cache, capsys):
    """`evaluate.py --workdir W --data-dir D`: every exit's test accuracy, then the backbone's
    self-report on the held-out images the experts train on (never the calibration ones)."""
    sys.path.insert(0, str(ROOT))
    import evaluate
    assert evaluate.main(["--workdir", str(tiny_workdir), "--data-dir", str(image_folder),
                          "--cache-dir", str(decode_cache), "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "O1 test accuracy" in out and "O2 test accuracy" in out
    n = tiny_cfg.val_size - tiny_cfg.calib_size
    assert f"({n} images)" in out and "held-out O1" in out


def test_evaluate_in_bfloat16_checked_chooses_its_margins_on_first_use(
        tiny_workdir, tiny_cfg, image_folder, decode_cache, tmp_path, capsys):
    """`--compute-dtype bfloat16_checked` on a workdir without margins chooses them on the
    held-out split, stores them, and evaluates; the next run reads them."""
    sys.path.insert(0, str(ROOT))
    import evaluate
    from conftest import copy_workdir
    w = copy_workdir(tiny_workdir, tmp_path / "w")
    args = ["--workdir", str(w), "--data-dir", str(image_folder), "--cache-dir",
            str(decode_cache), "--batch-size", "8", "--compute-dtype", "bfloat16_checked"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    n = tiny_cfg.val_size - tiny_cfg.calib_size
    assert f"margins on {n} held-out images" in out and "O2 test accuracy" in out
    assert (w / "precision_check.json").exists()
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "choosing" not in out
    # the held-out self-report runs through the checked cascade: float32's labels there
    gap = [line for line in out.splitlines() if "held-out O1" in line and "difference" in line]
    assert evaluate.main(args[:-2]) == 0   # float32
    assert gap == [line for line in capsys.readouterr().out.splitlines()
                   if "held-out O1" in line and "difference" in line]
