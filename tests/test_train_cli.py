import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_help_explains_the_flags():
    r = _run("--help")
    assert r.returncode == 0
    for flag in ("--stage", "--config", "--workdir", "--data-dir", "--set", "--retrain",
                 "--cpu-devices"):
        assert flag in r.stdout


def _common(image_folder, cache):
    # The tiny config as the session's tiny run trains it (so its compilations are reused and
    # its parameters are the reference), with checkpoints every 4 steps instead of 8 so that
    # the SIGKILL test can stop a run between two saves; the interval changes no parameter.
    return ["--stage", "all", "--config", "tiny", "--data-dir", str(image_folder),
            "--cache-dir", str(cache), "--set", "checkpoint_every_steps=4"]


def test_user_mistakes_give_a_message_not_a_traceback(tmp_path):
    r = _run("--config", "tiny", "--workdir", str(tmp_path), "--data-dir", str(tmp_path / "x"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run("--config", "tiny", "--workdir", str(tmp_path), "--set", "epochs")
    assert r.returncode == 2 and "FIELD=VALUE" in r.stderr
    r = _run("--config", "tiny", "--workdir", str(tmp_path), "--set", "batch_size=0")
    assert r.returncode == 1 and "config field batch_size must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr


def _latest_step(ckpt_dir):
    steps = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.is_dir() else []
    return max(steps, default=-1)


def _kill_when(cmd, ckpt_dir, at_least, log):
    """Starts `cmd`, SIGKILLs it as soon as `ckpt_dir` holds a step >= at_least; returns the
    newest step seen just before the kill."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while _latest_step(ckpt_dir) < at_least:
            assert proc.poll() is None, Path(log).read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
        seen = _latest_step(ckpt_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return seen


def test_cli_killed_in_either_stage_then_rerun_ends_as_the_library_run(
        tiny_run, image_folder, decode_cache, tmp_path):
    """`train.py --stage all` in a real subprocess, killed with SIGKILL mid-backbone, then
    mid-expert: each rerun of the same command resumes from the last checkpoint (<= one
    interval lost), both stages report and write their results, and the final parameters
    equal, bit for bit, those of the session's uninterrupted in-process run (`tiny_run`):
    the CLI trains what the library trains, across processes and resumes."""
    import numpy as np
    from cnneb_jax.workdir import load_trained

    ref = tiny_run[0]
    common = _common(image_folder, decode_cache)
    work = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *common, "--workdir", str(work)]
    seen = _kill_when(cmd, work / "backbone" / "ckpt", 8, tmp_path / "log1")
    assert not (work / "backbone" / "result.json").exists()
    seen = _kill_when(cmd, work / "expert" / "ckpt", 8, tmp_path / "log2")
    log2 = (tmp_path / "log2").read_text()
    resumed = int(re.search(r"\[backbone\] resuming from step (\d+)", log2).group(1))
    assert resumed >= 8 and resumed % 4 == 0
    assert "[backbone] test accuracy" in log2
    final = _run(*common, "--workdir", str(work))
    assert final.returncode == 0, final.stderr[-2000:]
    assert "[expert] test AUC" in final.stdout
    assert (work / "backbone" / "result.json").exists() and (work / "expert" / "result.json").exists()
    resumed = int(re.search(r"\[expert\] resuming from step (\d+)", final.stdout).group(1))
    assert resumed >= seen  # at most one checkpoint interval lost
    _, a = load_trained(ref)
    _, b = load_trained(work)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
