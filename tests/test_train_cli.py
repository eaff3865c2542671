import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_help_explains_the_flags():
    r = _run("--help")
    assert r.returncode == 0
    for flag in ("--stage", "--config", "--workdir", "--data-dir", "--set", "--retrain"):
        assert flag in r.stdout


def test_cli_runs_both_stages(image_folder, tmp_path):
    r = _run("--stage", "all", "--config", "tiny", "--workdir", str(tmp_path / "w"),
             "--data-dir", str(image_folder), "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[backbone] test accuracy" in r.stdout and "[expert] test AUC" in r.stdout


def test_user_mistakes_give_a_message_not_a_traceback(tmp_path):
    r = _run("--config", "tiny", "--workdir", str(tmp_path), "--data-dir", str(tmp_path / "x"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run("--config", "tiny", "--workdir", str(tmp_path), "--set", "epochs")
    assert r.returncode == 2 and "FIELD=VALUE" in r.stderr
