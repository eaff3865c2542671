import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax import checkpoints as ckpt
from cnneb_jax.configs import get_config


def test_round_trip_keeps_values_and_structure(tmp_path):
    import optax
    state = {"params": {"a": jnp.arange(6.0).reshape(2, 3)}, "stats": {"m": jnp.ones(3)},
             "opt": optax.sgd(0.1, 0.9).init({"a": jnp.zeros((2, 3))})}
    mngr = ckpt.manager(tmp_path / "stage")
    ckpt.save(mngr, 7, state, {"step": 7})
    like = jax.tree_util.tree_map(jnp.zeros_like, state)
    step, restored, meta = ckpt.restore_latest(mngr, like)
    assert step == 7 and meta["step"] == 7
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(a, b)
    assert type(restored["opt"]) is type(state["opt"])


def test_latest_of_several_and_empty(tmp_path):
    mngr = ckpt.manager(tmp_path / "s")
    assert ckpt.restore_latest(mngr, {"x": jnp.zeros(2)}) is None
    for step in (2, 4, 6, 8):
        ckpt.save(mngr, step, {"x": jnp.full(2, float(step))}, {"step": step})
    step, state, _ = ckpt.restore_latest(mngr, {"x": jnp.zeros(2)})
    assert step == 8 and float(state["x"][0]) == 8.0
    assert len(mngr.all_steps()) == 3  # max_to_keep


def test_has_steps_only_once_a_step_is_saved(tmp_path):
    """What tells a stage it resumes (and so skips random init): no folder, an empty one
    and a half-written step do not count."""
    assert not ckpt.has_steps(tmp_path / "s")
    assert not (tmp_path / "s").exists()            # asking creates nothing
    mngr = ckpt.manager(tmp_path / "s")
    assert not ckpt.has_steps(tmp_path / "s")
    (tmp_path / "s" / "ckpt" / "2.orbax-checkpoint-tmp-1").mkdir()
    assert not ckpt.has_steps(tmp_path / "s")
    ckpt.save(mngr, 4, {"x": jnp.zeros(2)}, {"step": 4})
    assert ckpt.has_steps(tmp_path / "s")


def test_workdir_refuses_another_config(tmp_path):
    cfg = get_config("tiny")
    ckpt.check_config(tmp_path, cfg)
    ckpt.check_config(tmp_path, cfg.replace(eval_batch_size=3))  # run-only field: fine
    with pytest.raises(ckpt.CheckpointError, match="num_classes: 10 there vs 100 here"):
        ckpt.check_config(tmp_path, cfg.replace(num_classes=100))
    assert ckpt.load_config(tmp_path) == cfg


def test_workdir_that_is_a_file_or_holds_an_edited_config_is_a_clear_error(tmp_path):
    cfg = get_config("tiny")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="is an existing file, not a folder"):
        ckpt.check_config(tmp_path / "file", cfg)
    ckpt.check_config(tmp_path / "w", cfg)
    raw = (tmp_path / "w" / "config.json").read_text().replace('"batch_size": 8', '"batch_size": 0')
    (tmp_path / "w" / "config.json").write_text(raw)
    with pytest.raises(ckpt.CheckpointError, match="invalid config: config field batch_size"):
        ckpt.load_config(tmp_path / "w")


def test_workdir_from_before_a_field_existed_keeps_its_behaviour(tmp_path):
    """A config.json written before the EMA and alternating flips existed loads with them
    off (its checkpoints hold no EMA), not with today's recipe defaults."""
    import json
    cfg = get_config("cifar")
    old = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items()
           if k not in ("ema_decay", "flip", "bn_bias_lr_mult", "eval_every_epochs")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = ckpt.load_config(tmp_path)
    assert (loaded.ema_decay, loaded.flip) == (0.0, "random")
    with pytest.raises(ckpt.CheckpointError, match="ema_decay: 0.0 there vs 0.99 here"):
        ckpt.check_config(tmp_path, cfg)
    ckpt.check_config(tmp_path, loaded)
    # a field added later without a past value (it changes nothing a workdir holds, like
    # the kernel library, or a field whose default `cifar` keeps) compares as its default
    fresh = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items()
             if k not in ("onednn", "dropout")}
    (tmp_path / "config.json").write_text(json.dumps(fresh))
    assert ckpt.config_diff(tmp_path, ckpt.load_config(tmp_path)) == ""
    ckpt.check_config(tmp_path, cfg)
    with pytest.raises(ckpt.CheckpointError, match="dropout: 0.0 there vs 0.1 here"):
        ckpt.check_config(tmp_path, cfg.replace(dropout=0.1))


def _three_steps(tmp_path):
    mngr = ckpt.manager(tmp_path / "stage")
    for step in (2, 4, 6):
        ckpt.save(mngr, step, {"x": jnp.full(1000, float(step))}, {"step": step})
    return mngr


def _truncate_data_files(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
    mngr = _three_steps(tmp_path)
    step_dir = tmp_path / "stage" / "ckpt" / "6"
    if damage == "truncate":
        _truncate_data_files(step_dir)
    else:
        (step_dir / "state" / "manifest.ocdbt").unlink()
    step, state, meta = ckpt.restore_latest(mngr, {"x": jnp.zeros(1000)})
    assert step == 4 and meta["step"] == 4 and float(state["x"][0]) == 4.0
    err = capsys.readouterr().err
    assert str(step_dir) in err and "damaged" in err and "falling back to step 4" in err
    # The damaged step is moved aside, so a later save of step 6 starts clean.
    assert (tmp_path / "stage" / "damaged" / "6").is_dir() and not step_dir.exists()
    ckpt.save(mngr, 6, {"x": jnp.full(1000, 7.0)}, {"step": 6})
    assert ckpt.restore_latest(mngr, {"x": jnp.zeros(1000)})[0] == 6


def test_no_good_checkpoint_left_is_a_clear_error(tmp_path):
    mngr = _three_steps(tmp_path)
    for step in (2, 4, 6):
        _truncate_data_files(tmp_path / "stage" / "ckpt" / str(step))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* could be restored"):
        ckpt.restore_latest(mngr, {"x": jnp.zeros(1000)})


def test_half_written_step_from_a_killed_save_is_ignored(tmp_path):
    """Orbax writes a step into a temporary folder and renames it when complete; a kill
    during a save leaves only that temporary folder, which restore never picks up."""
    mngr = _three_steps(tmp_path)
    mngr.close()
    tmp = tmp_path / "stage" / "ckpt" / "8.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"\0" * 10)
    mngr = ckpt.manager(tmp_path / "stage")
    step, state, _ = ckpt.restore_latest(mngr, {"x": jnp.zeros(1000)})
    assert step == 6 and float(state["x"][0]) == 6.0


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    """A crash while writing result.json/config.json leaves the old file, never half a file."""
    path = tmp_path / "result.json"
    ckpt.write_json(path, {"a": 1})
    import os
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        ckpt.write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 1\n}'


def test_workdir_refuses_data_with_other_classes(tmp_path):
    from cnneb_jax.checkpoints import CheckpointError, read_classes, record_classes
    assert read_classes(tmp_path) is None
    record_classes(tmp_path, ["cat", "dog"])
    record_classes(tmp_path, np.array(["cat", "dog"]))   # the same names again: fine
    assert read_classes(tmp_path) == ["cat", "dog"]
    with pytest.raises(CheckpointError, match=r"trained on classes \['cat', 'dog'\].*"
                                              r"the data has \['cat', 'emu'\]"):
        record_classes(tmp_path, ["cat", "emu"])


def test_tensorboard_is_skipped_with_one_warning_without_tensorboard(tmp_path, monkeypatch,
                                                                      capsys):
    import sys
    for name in ["tensorboard", *[m for m in sys.modules if m.startswith("tensorboard.")]]:
        monkeypatch.setitem(sys.modules, name, None)   # `import tensorboard...` raises
    monkeypatch.setattr(ckpt, "_WARNED", set())
    for step in range(2):
        ckpt.write_scalars(tmp_path / "tb", "sweep", step, {"accuracy": 0.9})
    assert not (tmp_path / "tb").exists()
    assert capsys.readouterr().err.count("event files skipped") == 1


def test_scalars_are_written_without_tensorflow_and_read_back_by_tensorboard(tmp_path):
    """In a fresh process, writing the events imports no TensorFlow; TensorBoard then reads
    each value at its step, as tensors under the scalars plugin (as tf.summary writes)."""
    import subprocess
    import sys
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    script = ("import sys\nfrom pathlib import Path\nfrom cnneb_jax import checkpoints as c\n"
              "for step in (3, 4):\n"
              "    c.write_scalars(Path(sys.argv[1]), 'stage', step, {'loss': step / 8, 'acc': 0.5})\n"
              "print('tensorflow' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tb")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"stage/loss", "stage/acc"}
    events = acc.Tensors("stage/loss")
    assert [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events] == [
        (3, 0.375), (4, 0.5)]
    assert acc.SummaryMetadata("stage/loss").plugin_data.plugin_name == "scalars"
    assert len(list((tmp_path / "tb").iterdir())) == 1   # one event file per process


def test_a_damaged_config_json_names_the_file(tmp_path):
    cfg = get_config("tiny")
    ckpt.check_config(tmp_path, cfg)
    path = tmp_path / "config.json"
    path.write_text(path.read_text()[:40])            # truncated
    with pytest.raises(ckpt.CheckpointError, match=r"config.json is damaged .*backup"):
        ckpt.load_config(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"config.json is damaged"):
        ckpt.check_config(tmp_path, cfg)
    (tmp_path / ckpt.CLASS_NAMES_FILE).write_text('["cat", "do')
    with pytest.raises(ckpt.CheckpointError, match=r"class_names.json is damaged"):
        ckpt.read_classes(tmp_path)


def test_checkpoint_shapes_other_than_the_config_name_the_field_and_keep_the_steps(tmp_path):
    """A config.json edited after training (here the width) makes the shapes disagree:
    a message naming the variable and the field, and the checkpoint stays where it is
    (it is not damaged)."""
    import dataclasses
    cfg = get_config("tiny")
    ckpt.check_config(tmp_path, cfg)
    mngr = ckpt.manager(tmp_path / "backbone")
    ckpt.save(mngr, 4, {"params": {"k": jnp.ones((3, 8))}},
              {"step": 4, "config": dataclasses.asdict(cfg)})
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"width": 0.0625', '"width": 0.125'))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"\['params'\]\['k'\] is \(3, 8\) there, \(3, 16\) here; width: "
                             r"0.0625 in the checkpoint vs 0.125 in config.json"):
        ckpt.restore_latest(mngr, {"params": {"k": jnp.ones((3, 16))}})
    assert mngr.all_steps() == [4] and not (tmp_path / "backbone" / "damaged").exists()


def test_a_full_disk_during_a_save_stops_with_a_plain_message(tmp_path, monkeypatch):
    import errno
    mngr = ckpt.manager(tmp_path / "stage")
    ckpt.save(mngr, 2, {"x": jnp.zeros(2)}, {"step": 2})

    def full(*args, **kwargs):
        raise ValueError("write failed") from OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mngr, "save", full)
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on the disk of .* while "
                                                   r"writing step 4: .* resumes from step 2"):
        ckpt.save(mngr, 4, {"x": jnp.ones(2)}, {"step": 4})


def test_one_trainer_per_workdir_and_a_killed_ones_lock_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from cnneb_jax import checkpoints as c\n"
         f"with c.workdir_lock({str(tmp_path)!r}):\n"
         "    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.CheckpointError,
                           match=rf"in use by another trainer \(pid {holder.pid} on"):
            with ckpt.workdir_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    with ckpt.workdir_lock(tmp_path):   # the dead holder's lock is gone
        assert f"pid {__import__('os').getpid()}" in (tmp_path / ".lock").read_text()
