"""The training loop: resume, Ctrl-C, a diverging loss, the batches it hands the step."""

import json
import shutil

import numpy as np
import pytest

from cnneb_jax.backbone_stage import train_backbone
from cnneb_jax.workdir import TrainingError, load_backbone

from conftest import copy_workdir, leaves_equal


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


def test_finished_stage_is_not_retrained(trained, tiny_cfg, tiny_data, capsys):
    workdir, b, _ = trained
    again = train_backbone(tiny_cfg, tiny_data, workdir)
    assert again == b
    assert "already trained" in capsys.readouterr().out


def test_resume_after_interruption_gives_identical_parameters(trained, tiny_cfg, tiny_data,
                                                              tmp_path):
    """A run that lost its last checkpoint and its result (as after a crash) resumes from
    the previous checkpoint and ends bit-identical to the uninterrupted session run."""
    full_dir = trained[0]
    cut_dir = copy_workdir(full_dir, tmp_path / "cut")
    steps = sorted(int(p.name) for p in (cut_dir / "backbone" / "ckpt").iterdir()
                   if p.name.isdigit())
    assert len(steps) >= 2
    shutil.rmtree(cut_dir / "backbone" / "ckpt" / str(steps[-1]))
    (cut_dir / "backbone" / "result.json").unlink()
    train_backbone(tiny_cfg, tiny_data, cut_dir)
    log = [json.loads(l) for l in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "test" and log[-2]["step"] == steps[-1]  # really retrained
    _, a = load_backbone(full_dir, tiny_cfg)
    _, b = load_backbone(cut_dir, tiny_cfg)
    assert leaves_equal(a, b)


def test_ctrl_c_saves_the_steps_done_and_resumes_bit_identical(trained, tiny_cfg, tiny_data,
                                                               tmp_path, monkeypatch):
    """Ctrl-C in the middle of the loop keeps every finished step (a checkpoint between the
    regular ones), says how to resume, and the resumed run equals the uninterrupted one.
    It starts from the session run's step-40 checkpoint (the steps before are the resume
    test's and the CLI's), is interrupted after step 44 and finishes at 48."""
    from cnneb_jax import backbone_stage, loop
    work = copy_workdir(trained[0], tmp_path / "w")
    for p in (work / "backbone" / "ckpt").iterdir():
        if p.name.isdigit() and int(p.name) > 40:
            shutil.rmtree(p)
    (work / "backbone" / "result.json").unlink()
    real = backbone_stage.make_backbone_step
    calls = []

    def interrupting(*args, **kw):
        step = real(*args, **kw)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return step(*a)
        return wrapped

    monkeypatch.setattr(backbone_stage, "make_backbone_step", interrupting)
    with pytest.raises(loop.TrainingInterrupted, match="step 44/48.*run the same command again"):
        train_backbone(tiny_cfg, tiny_data, work)
    # 44 is not a multiple of checkpoint_every_steps (8): saved on Ctrl-C.
    assert (work / "backbone" / "ckpt" / "44").is_dir()
    monkeypatch.setattr(backbone_stage, "make_backbone_step", real)
    train_backbone(tiny_cfg, tiny_data, work)
    log = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert log[-2]["step"] == 48 and log[-1]["event"] == "test"
    _, a = load_backbone(trained[0], tiny_cfg)
    _, b = load_backbone(work, tiny_cfg)
    assert leaves_equal(a, b)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path):
    """A step function whose loss turns NaN at step 3 (checkpoints every 2 steps): the run
    stops at the next check, which every save makes (step 4), with a clear message; the
    newest checkpoint is step 2's, finite."""
    import jax.numpy as jnp
    from cnneb_jax import checkpoints as ckpt
    from cnneb_jax.loop import StageSpec, run_stage

    def step_fn(state, images, labels, rng):
        x = state["x"] + 1.0
        diverged = jnp.isnan(x) | (x >= 3.0)
        loss = jnp.where(diverged, jnp.nan, 0.5)
        return {"x": jnp.where(diverged, jnp.nan, x)}, {"loss": loss}

    cfg = tiny_cfg.replace(checkpoint_every_steps=2)
    images = np.zeros((40, 32, 32, 3), np.uint8)
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        run_stage(StageSpec("backbone", images, np.zeros(40, np.int32), 8, 1, ((0, step_fn),)),
                  tmp_path, cfg, {"x": jnp.zeros(())})
    mngr = ckpt.manager(tmp_path / "backbone")
    step, state, _ = ckpt.restore_latest(mngr, {"x": jnp.zeros(())})
    mngr.close()
    assert step == 2 and float(state["x"]) == 2.0


def test_alternate_flip_mirrors_the_batches_the_step_sees(tiny_cfg, tmp_path):
    """With flip=alternate the loop hands the step each image mirrored in every other
    epoch (and the step itself no longer flips at random)."""
    from cnneb_jax.augment import alternating_flips
    from cnneb_jax.loop import StageSpec, run_stage
    cfg = tiny_cfg.replace(flip="alternate", checkpoint_every_steps=1000)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 3), np.uint8)
    labels = np.arange(16, dtype=np.int32)
    seen = {}

    def step(state, batch, batch_labels, key):
        for im, y in zip(np.asarray(batch), np.asarray(batch_labels)):
            seen.setdefault(int(y), []).append(im)
        return state, {"loss": np.float32(0.0)}

    run_stage(StageSpec("probe", images, labels, batch_size=8, epochs=3, steps=((0, step),),
                        alternate_flips=True), tmp_path, cfg, {"x": np.zeros(1, np.float32)})
    first = alternating_flips(cfg.seed, 16, 0)
    for y, views in seen.items():
        assert len(views) == 3
        for epoch, im in enumerate(views):
            mirrored = bool(first[y]) ^ bool(epoch % 2)
            np.testing.assert_array_equal(im, images[y][:, ::-1] if mirrored else images[y])
