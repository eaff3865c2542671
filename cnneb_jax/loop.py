"""The training loop both stages share. A stage is data (a `StageSpec`: its images, batch
size, epochs, train steps and held-out images); `run_stage` reads top to bottom: restore or
start, then per step a batch, the train step, the log and the checkpoint, and at an epoch's
end the held-out accuracy of the evaluation variables.

Every step's batch depends only on (seed, epoch), so a resumed run sees the same batches; a
checkpoint is written every `checkpoint_every_steps`, after checking the loss, and on
Ctrl-C, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from cnneb_jax import checkpoints as ckpt
from cnneb_jax import distributed as dist
from cnneb_jax import pipeline
from cnneb_jax.augment import alternating_flips
from cnneb_jax.configs import Config
from cnneb_jax.evaluation import exit_accuracies, make_predict_fn, predict_all
from cnneb_jax.model import Model
from cnneb_jax.optim import eval_variables
from cnneb_jax.workdir import TrainingError


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training loop; the message says where to resume from."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What a stage trains on and with; the loop needs nothing else."""
    name: str                     # "backbone" or "expert": its folder in the workdir
    images: Any                   # uint8 NHWC array or pipeline.FileSplit
    labels: np.ndarray
    batch_size: int
    epochs: int
    # (first step, train step): each train step runs from its first step on (progressive
    # resizing trains at a low resolution first). A step takes (state, images, labels,
    # rng, *step_args) and returns (state, metrics with "loss").
    steps: tuple[tuple[int, Callable], ...]
    step_args: tuple = ()
    alternate_flips: bool = False   # mirror half the images, the other half next epoch
    # Held-out (images, labels), evaluated with `model` every `eval_every` epochs (through
    # `predict`, evaluation.make_predict_fn's, when the stage compiled one already).
    heldout: tuple = ()
    model: Model | None = None
    predict: Callable | None = None
    eval_every: int = 0
    eval_batch_size: int = 500

    @property
    def steps_per_epoch(self) -> int:
        return len(self.images) // self.batch_size

    def step_fn(self, step: int) -> Callable:
        return [fn for first, fn in self.steps if first <= step][-1]


def _restore(mngr, state: dict, name: str, total: int) -> tuple[int, dict]:
    restored = ckpt.restore_latest(mngr, state)
    if restored is None:
        return 0, state
    print(f"[{name}] resuming from step {restored[0]}/{total}")
    return restored[0], restored[1]


def _epoch_stream(spec: StageSpec, cfg: Config, epoch: int, first: int, rows):
    # The order depends only on (seed, epoch): a resumed run sees the same batches.
    perm = pipeline.epoch_batches(np.random.default_rng([cfg.seed, epoch]), len(spec.images),
                                  spec.batch_size)
    mirror = (alternating_flips(cfg.seed, len(spec.images), epoch) if spec.alternate_flips
              else None)
    return pipeline.batches(spec.images, spec.labels, perm[first:, rows], train=True,
                            seed=cfg.seed, epoch=epoch, mirror=mirror)


def _evaluate(spec: StageSpec, state: dict, predict, workdir: Path, epoch: int, done: int,
              pbar) -> dict | None:
    """Held-out accuracy after `epoch` (never test: the per-epoch curve settings are chosen
    from), logged; returns the outputs it came from."""
    if spec.model is None or not len(spec.heldout[0]):
        return None
    out = predict_all(spec.model, eval_variables(state), spec.heldout[0],
                      spec.eval_batch_size, predict=predict)
    accs = {f"heldout_{k}": v for k, v in exit_accuracies(out, spec.heldout[1]).items()}
    ckpt.log_metrics(workdir, {"stage": spec.name, "event": "epoch", "epoch": epoch,
                               "step": done, **accs})
    pbar.write(f"[{spec.name}] epoch {epoch}: " + ", ".join(f"{k} {v:.4f}"
                                                           for k, v in accs.items()))
    return out


def run_stage(spec: StageSpec, workdir: Path, cfg: Config, state: dict
              ) -> tuple[dict, dict | None]:
    """Trains `state` for the stage (resuming from its latest checkpoint); returns the
    final state and the last epoch's held-out outputs (None without held-out images).
    One function, on purpose: the loop reads top to bottom, as Flax's examples do."""
    stage_dir = workdir / spec.name
    per_epoch = spec.steps_per_epoch
    total = spec.epochs * per_epoch
    if per_epoch == 0:
        raise TrainingError(f"{spec.name}: {len(spec.images)} images are fewer than one "
                            f"batch of {spec.batch_size}")
    # Data parallel: parameters and optimizer state replicated, every batch split over all
    # devices (a no-op layout on a single device).
    mesh = dist.data_mesh()
    dist.check_batch(spec.batch_size)
    state = dist.replicate(mesh, state)
    step_args = dist.replicate(mesh, spec.step_args)
    mngr = ckpt.manager(stage_dir)
    start, state = _restore(mngr, state, spec.name, total)
    predict = spec.predict or (make_predict_fn(spec.model) if spec.model is not None else None)
    # Each step records the config it was trained with: a config.json edited later is
    # then named field by field (checkpoints.restore_latest).
    meta = lambda step: {"step": step, "stage": spec.name, "config": dataclasses.asdict(cfg)}
    key, rows = jax.random.PRNGKey(cfg.seed), dist.process_rows(spec.batch_size)
    pbar = tqdm(total=total, initial=start, desc=spec.name, unit="step", dynamic_ncols=True)
    stream, t0, seen, last_fn, last_out = None, time.perf_counter(), 0, None, None
    done = saved = start
    metrics = None
    try:
        for step in range(start, total):
            epoch, i = divmod(step, per_epoch)
            if stream is None or i == 0:
                stream = _epoch_stream(spec, cfg, epoch, i, rows)
            images, labels = dist.shard_local(mesh, spec.batch_size, *next(stream))
            fn = spec.step_fn(step)
            if fn is not last_fn:
                # Another step function (another resolution): img/s restarts.
                t0, seen, last_fn = time.perf_counter(), 0, fn
            state, metrics = fn(state, images, labels, jax.random.fold_in(key, step),
                                *step_args)
            done, seen = step + 1, seen + spec.batch_size
            saving = done % cfg.checkpoint_every_steps == 0 or done == total
            # Check the loss before every save: a checkpoint never holds diverged parameters.
            if done % 10 == 0 or saving:
                _log_step(spec.name, workdir, stage_dir, metrics, done, epoch,
                          seen / (time.perf_counter() - t0), pbar)
            pbar.update(1)
            if saving:
                ckpt.save(mngr, done, state, meta(done))
                saved = done
            if done % per_epoch == 0 and spec.eval_every and (epoch + 1) % spec.eval_every == 0:
                t_eval = time.perf_counter()
                last_out = _evaluate(spec, state, predict, workdir, epoch + 1, done, pbar)
                t0 += time.perf_counter() - t_eval  # img/s counts training only
    except KeyboardInterrupt:
        pbar.close()
        # Keep the steps done so far (unless the loss had diverged): nothing is lost.
        if done > saved and metrics is not None and math.isfinite(float(metrics["loss"])):
            ckpt.save(mngr, done, state, meta(done))
            saved = done
        mngr.close()
        raise TrainingInterrupted(
            f"[{spec.name}] interrupted at step {done}/{total}; checkpoint of step {saved} "
            f"kept in {stage_dir / 'ckpt'}: run the same command again to resume") from None
    pbar.close()
    mngr.close()
    final_epoch_evaluated = spec.eval_every and spec.epochs % spec.eval_every == 0
    return state, (last_out if final_epoch_evaluated and start < total else None)


def _log_step(name: str, workdir: Path, stage_dir: Path, metrics: dict, done: int,
              epoch: int, rate: float, pbar) -> None:
    last = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(last["loss"]):
        raise TrainingError(f"{name}: loss became {last['loss']} at step {done}; the last "
                            f"good checkpoint is kept in {stage_dir / 'ckpt'}")
    pbar.set_postfix({**{k: f"{v:.3f}" for k, v in last.items()}, "img/s": f"{rate:.0f}"})
    ckpt.log_metrics(workdir, {"stage": name, "step": done, "epoch": epoch,
                               "img_per_s": rate, **last})
