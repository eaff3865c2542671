"""Every benchmark in bench/ runs, on the tiny config or the tiny workdir, in seconds: a
refactor that breaks one fails here. (bench/early_exit.py reads a sweep.json: it runs on
the tiny sweep in test_report.py.) The figures themselves are measured on real configs, by
hand; nothing here times anything."""

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_every_benchmark_has_a_test_here_or_named_above():
    tested = {"flops", "train_throughput", "decode_cache", "input_pipeline", "serving",
              "precision_agreement", "load_time", "peer", "keras_agreement", "early_exit"}
    assert {p.stem for p in BENCH.glob("*.py")} - {"benchlib"} == tested


def test_flops(capsys):
    bench("flops").main(["--config", "tiny"])
    out = capsys.readouterr().out
    assert "| seg:stem->Mixed_5b |" in out and "prefix (first segment + O1 + E1)" in out


def test_train_throughput(capsys):
    bench("train_throughput").main(["base", "--config", "tiny", "--steps", "1",
                                    "--rounds", "1"])
    out = capsys.readouterr().out
    assert "| base |" in out and "1.000 (1.000-1.000)" in out


def test_decode_cache(image_folder, capsys):
    bench("decode_cache").main(["--data-dir", str(image_folder), "--repeats", "1"])
    out = capsys.readouterr().out
    assert "first read:" in out and "warm read:" in out


def test_input_pipeline(image_folder, capsys):
    bench("input_pipeline").main(["throughput", "--data-dir", str(image_folder),
                                  "--config", "tiny", "--steps", "1", "--rounds", "1"])
    assert "stream / memory:" in capsys.readouterr().out


def test_serving(tiny_workdir, image_folder, decode_cache, tmp_path, capsys):
    out = tmp_path / "serving.json"
    bench("serving").main(["--workdir", str(tiny_workdir), "--data-dir", str(image_folder),
                           "--images", "16", "--request-batch", "4", "--max-batch", "8",
                           "--rounds", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| per-batch |" in text and "| throughput mode |" in text
    import json
    result = json.loads(out.read_text())
    # Same programs, same rule and threshold: every sample leaves at the same exit.
    assert result["modes"]["throughput mode"]["exits_agree"] == 1.0
    assert result["export"]["uint8"]["label_agree"] == 1.0


def test_precision_agreement(tiny_workdir, image_folder, capsys):
    bench("precision_agreement").main(["--workdir", str(tiny_workdir), "--data-dir",
                                       str(image_folder), "--batch-size", "16"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| float32 | off")]
    assert lines and "100.00%" in lines[0]   # the reference agrees with itself


def test_load_time(tiny_workdir, capsys):
    bench("load_time").main(["--workdir", str(tiny_workdir), "--max-batch", "2"])
    out = capsys.readouterr().out
    assert "second load" in out and "compilations during predict afterwards: 0" in out


def test_peer_runs_our_side(capsys):
    bench("peer").main(["--only", "forward", "--batches", "1", "--rounds", "1",
                        "--seconds", "0", "--no-keras", "--config", "tiny"])
    out = capsys.readouterr().out
    assert "| tiny |" in out and "| forward, batch 1 |" in out and "failed" not in out
    # bfloat16_deep and bfloat16_checked are timed too (ours only), and the fastest
    # label-keeping precision named
    assert "ours forward bfloat16_deep b1:" in out and "best valid vs Keras bf16" in out
    assert "ours forward bfloat16_checked b1:" in out
    row = next(l for l in out.splitlines() if l.startswith("| forward, batch 1 |"))
    assert row.count(" - ") == 0    # each of our four precisions has a time


def test_peer_refuses_a_baseline_that_would_run_this_checkouts_code(tmp_path):
    # a "tree" without cnneb_jax: its worker would import this checkout's (the venv's
    # editable install) and time it as the baseline
    (tmp_path / "bench").mkdir()
    with pytest.raises(SystemExit, match="imports cnneb_jax from"):
        bench("peer").main(["--only", "forward", "--batches", "1", "--rounds", "1",
                            "--no-keras", "--config", "tiny", "--baseline-tree", str(tmp_path)])


def test_keras_agreement(capsys):
    bench("keras_agreement").main(["--size", "75", "--images", "1"])
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("| XLA |"))
    assert float(row.split("|")[2]) < 1e-4 and "100%" in row
