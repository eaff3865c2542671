"""Data parallelism on 4 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)
against 1 device: the same global batch gives the same loss curve, and evaluation and the
early-exit controller give the same answers. Each device count needs its own process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnneb_jax import distributed as dist

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from pathlib import Path
import jax, numpy as np
from cnneb_jax.configs import get_config
from cnneb_jax.controller import run_cascade
from cnneb_jax.programs import make_cascade
from cnneb_jax.data import load_dataset
from cnneb_jax.workdir import load_trained
from cnneb_jax.evaluation import predict_all
from cnneb_jax.backbone_stage import train_backbone
from cnneb_jax.expert_stage import train_expert
folder, cache, work, out = sys.argv[1:5]
# float64 throughout (JAX_ENABLE_X64=1), so that summation order moves numbers by ~1e-16.
# 4 steps per stage (32 images in batches of 8; 4 expert epochs of one full batch): each
# float64 step runs for seconds at the suite's LLVM level 0; a checkpoint (and a logged
# loss) after every step gives 4 points per curve to compare.
cfg = get_config("tiny").replace(epochs=1, max_train_examples=32, expert_epochs=4,
                                 checkpoint_every_steps=1, compute_dtype="float64")
data = load_dataset(cfg, folder, Path(cache))
train_backbone(cfg, data, work)
train_expert(cfg, data, work)
model, v = load_trained(work)
preds = predict_all(model, v, data["test_images"], 6)  # 6: rounded up to 8 on 4 devices
cascade = make_cascade(model, v, 16)
routed = run_cascade(cascade, data["test_images"], "max_softmax", 0.3)
leaves = {f"param{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(v))}
np.savez(out, devices=jax.device_count(), o1=preds["exits"][0], o2=preds["exits"][1],
         e1=preds["experts"][0], logits=routed["logits"], exit=routed["exit"], **leaves)
"""


def _start(n_devices, image_folder, cache, tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_ENABLE_X64"] = "1"
    work, out = tmp_path / f"work{n_devices}", tmp_path / f"out{n_devices}.npz"
    log = open(tmp_path / f"log{n_devices}", "w")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(image_folder), str(cache),
                             str(work), str(out)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, work, out, tmp_path / f"log{n_devices}"


def _finish(proc, out, log):
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return dict(np.load(out))


def _losses(work, stage):
    recs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and r["stage"] == stage}


def _assert_same_curve(a, b):
    assert a.keys() == b.keys() and len(a) >= 4
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a[key], b[key])


def test_four_devices_match_one_device(image_folder, decode_cache, tmp_path):
    """In float64, training on 4 devices follows the 1-device loss curve of both stages at
    every logged step and ends with the same parameters; evaluation and the controller give
    the same answers.

    Why float64: the randomly initialised tiny Inception is extremely ill-conditioned
    (BatchNorm over nearly constant channels, eps 1e-3, stacked ~40 deep): on one device,
    moving the input pixels by 1e-3 changes some gradients by ~8%. A different summation
    order grows by about 100x every 2 steps here: from float32's 1e-7 the two curves are 8%
    apart by step 4; from float64's 1e-16 they stay within ~1e-9 over 6 steps (one run saw
    6e-4 by step 12, so each curve is kept to 4 steps). The two processes run side
    by side (compilation is mostly single-threaded).
    """
    p1, one, out1, log1 = _start(1, image_folder, decode_cache, tmp_path)
    p4, four, out4, log4 = _start(4, image_folder, decode_cache, tmp_path)
    a, b = _finish(p1, out1, log1), _finish(p4, out4, log4)
    assert int(a["devices"]) == 1 and int(b["devices"]) == 4
    _assert_same_curve(_losses(one, "backbone"), _losses(four, "backbone"))
    _assert_same_curve(_losses(one, "expert"), _losses(four, "expert"))
    params = sorted(k for k in a if k.startswith("param"))
    assert params and params == sorted(k for k in b if k.startswith("param"))
    for k in params:
        assert a[k].dtype == np.float64
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # Each process evaluates its own parameters; after a few steps the logits are ~1e4, and
    # the ~1e-10 parameter differences reach ~1e-6 of them.
    for name in ("o1", "o2", "e1", "logits"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(a["exit"], b["exit"])


def test_batch_must_split_evenly_over_devices(monkeypatch):
    import jax
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    dist.check_batch(8)
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the 4 devices"):
        dist.check_batch(6)


SPLIT_SCRIPT = """
import os, jax
from cnneb_jax import distributed as dist
dist.split_cpu(3)
print(os.environ["XLA_FLAGS"], jax.device_count())
try:
    dist.split_cpu(2)
except RuntimeError as e:
    print("late:", e)
"""


def test_split_cpu_sets_the_device_count_once_and_only_before_jax_starts():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=5 --xla_dump_to=/x"}
    r = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    flags, count = r.stdout.splitlines()[0].rsplit(" ", 1)
    assert count == "3"
    assert flags.split() == ["--xla_dump_to=/x", "--xla_force_host_platform_device_count=3"]
    assert "late: split_cpu must be called before JAX uses any device" in r.stdout
    with pytest.raises(ValueError, match="at least 1"):
        dist.split_cpu(0)
