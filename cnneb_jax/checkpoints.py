"""Orbax checkpoints, one manager per training stage, plus the workdir's config record.

Layout of a workdir:
    config.json                 the config it was trained with (refuses a different one)
    backbone/ckpt/<step>/       Orbax steps: {"state": pytree, "meta": json}
    backbone/result.json        written when the stage finished (test accuracies, time)
    expert/ckpt/<step>/ ...     same for the expert stage
    class_names.json            the class names, in label order, as the data gave them
    metrics.jsonl               one JSON line per logged step / evaluation
    tensorboard/                the same numbers as TensorBoard event files
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnneb_jax.configs import Config, validate

# Fields that only change how a run goes, not the shapes or meaning of what it trains
# (compute_dtype: a float32-trained model may be evaluated in bf16 and vice versa).
_RUN_FIELDS = {"checkpoint_every_steps", "eval_batch_size", "name", "compute_dtype",
               "eval_every_epochs", "pipeline", "onednn_min_batch"}


# Config fields added after workdirs existed, with the value that reproduces a workdir
# made before them (the recipe's new defaults would not: no EMA was saved then).
_ADDED_FIELDS = {"ema_decay": 0.0, "bn_bias_lr_mult": 1.0, "eval_every_epochs": 0,
                 "flip": "random", "expert_inputs": "paper+confidence",
                 "stem_channels": 0, "whiten_stem": False, "resize": "none",
                 "pipeline": "auto", "group_pattern": "", "width_6": 0.0, "width_7": 0.0,
                 "lowres_size": 0, "lowres_epochs": 0.0, "identity_init": False,
                 "lr_start": 0.0, "lr_end": 0.0, "lookahead_every": 0, "lookahead_start": 0.27,
                 "pad_mode": "zeros", "input_norm": "cifar", "finetune": "heads",
                 "class_balance": "none"}


def _with_added_fields(raw: dict) -> dict:
    return {**_ADDED_FIELDS, **raw}


class CheckpointError(RuntimeError):
    """A workdir that cannot be used (other config, damaged checkpoints)."""


def manager(stage_dir: Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(stage_dir).absolute() / "ckpt", options=opts)


def has_steps(stage_dir: Path) -> bool:
    """Whether the stage has checkpoints to resume from. `restore_latest` then restores one
    or raises: a stage that has steps never silently starts afresh."""
    if not (Path(stage_dir) / "ckpt").is_dir():
        return False
    mngr = manager(stage_dir)
    try:
        return bool(mngr.all_steps())
    finally:
        mngr.close()


def _disk_full(e: BaseException) -> bool:
    # Orbax and TensorStore wrap the OS error: look through the chain and the message.
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Orbax writes into a temporary folder and renames it: a kill never leaves half a step.
    A disk that fills meanwhile stops with a plain message; the complete steps stay."""
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
    except Exception as e:
        if not _disk_full(e):
            raise
        kept = [s for s in mngr.all_steps() if s != step]
        raise CheckpointError(
            f"no space left on the disk of {mngr.directory} while writing step {step}: free "
            "some space and run the same command again; it resumes from "
            + (f"step {max(kept)}" if kept else "the start")) from None


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """One writer per workdir: an exclusive lock on `<workdir>/.lock` for the duration.
    The kernel drops the lock when its process dies, so a killed trainer never leaves a
    stale lock: the next one takes it over. A second trainer is refused at once, with the
    first one's process id."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"workdir {workdir} is an existing file, not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CheckpointError(f"workdir {workdir} is in use by another trainer ({holder}); "
                                  "wait for it to finish, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield
    finally:
        f.close()   # releases the lock


def restore_latest(mngr: ocp.CheckpointManager, like: Any,
                   partial: bool = False) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest step that restores, or None when there is none.
    With `partial`, `like` may name a part of the stored state (e.g. the parameters and
    statistics without the optimizer state): only that part is read.

    A step that fails to restore (truncated or missing file) is reported by name and moved
    to `<stage>/damaged/<step>` (kept for inspection, out of Orbax's way); the next older
    step is tried. If steps exist but none restores, raises CheckpointError.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    ckpt_dir = Path(mngr.directory)
    failures = []
    for step in steps:
        other = _other_shapes(mngr, step, like)
        if other is not None:
            # Not damage: the checkpoint is fine, the config that reads it is not its own.
            raise CheckpointError(
                f"checkpoint {ckpt_dir / str(step)} holds other shapes than this config "
                f"gives ({other}): the workdir's config.json was edited or replaced "
                "after training; restore it (or --retrain)")
        try:
            state_args = (ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
                if partial else ocp.args.StandardRestore(abstract))
            out = mngr.restore(step, args=ocp.args.Composite(
                state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises many types for damaged files
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            failures.append(f"step {step} ({reason})")
            aside = ckpt_dir.parent / "damaged" / str(step)
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(ckpt_dir / str(step), aside)
            mngr.reload()
            older = [s for s in steps if s < step]
            print(f"warning: checkpoint {ckpt_dir / str(step)} is damaged ({reason}); moved to "
                  f"{aside}; " + (f"falling back to step {older[0]}" if older
                                  else "no older checkpoint left"), file=sys.stderr)
            continue
        return step, out["state"], dict(out["meta"])
    raise CheckpointError(f"no checkpoint in {ckpt_dir} could be restored: "
                          + "; ".join(failures)
                          + ". Start the stage again with --retrain, or restore a backup.")


def _other_shapes(mngr: ocp.CheckpointManager, step: int, like: Any) -> str | None:
    """How a stored step's array shapes differ from `like`'s, naming the first variable and,
    when the step recorded its config, the fields that differ; None if they agree (or the
    step's metadata cannot be read: then restoring it tells what is damaged)."""
    step_dir = Path(mngr.directory) / str(step)
    try:
        # The handlers directly: the manager's item_metadata logs a warning per item.
        tree = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
        tree = getattr(tree, "tree", tree)
        stored = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in
                  jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))}
    except Exception:  # damaged metadata: the restore below reports it
        return None
    for path, leaf in jax.tree_util.tree_leaves_with_path(like):
        key = jax.tree_util.keystr(path)
        if key in stored and stored[key] != tuple(np.shape(leaf)):
            why = f"{key} is {stored[key]} there, {tuple(np.shape(leaf))} here"
            try:
                meta = dict(ocp.JsonCheckpointHandler().restore(step_dir / "meta"))
                theirs, mine = meta.get("config") or {}, read_config_json(
                    Path(mngr.directory).parent.parent / "config.json")
                fields = [f"{k}: {theirs[k]!r} in the checkpoint vs {mine.get(k)!r} in "
                          "config.json" for k in theirs
                          if k not in _RUN_FIELDS and theirs[k] != mine.get(k)]
                if fields:
                    why += "; " + ", ".join(fields)
            except Exception:  # an older step without its config: the variable says enough
                pass
            return why
    return None


def check_config(workdir: Path, cfg: Config) -> None:
    """Records the config in a new workdir; refuses a workdir trained with another one."""
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise CheckpointError(f"workdir {workdir} is an existing file, not a folder")
    path = Path(workdir) / "config.json"
    if path.exists():
        diff = config_diff(workdir, cfg)
        if diff:
            raise CheckpointError(f"workdir {workdir} was trained with another config ({diff}); "
                                  "use a new --workdir or the same config")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dataclasses.asdict(cfg))


def config_diff(workdir: Path, cfg: Config, ignore: tuple[str, ...] = ()) -> str:
    """The fields where the config recorded in `workdir` differs from `cfg`, as "field: A
    there vs B here, ...", leaving out the fields that only change how a run goes and those
    in `ignore`; "" when none."""
    # A field the workdir's config.json predates compares as the value it loads with
    # (load_config): _ADDED_FIELDS' where it changes behaviour, else today's default.
    theirs = {**dataclasses.asdict(Config()),
              **_with_added_fields(read_config_json(Path(workdir) / "config.json"))}
    mine = dataclasses.asdict(cfg)
    diff = [k for k in mine if k not in _RUN_FIELDS and k not in ignore
            and json.dumps(theirs.get(k)) != json.dumps(mine[k])]
    return ", ".join(f"{k}: {theirs.get(k)!r} there vs {mine[k]!r} here" for k in diff)


def read_json(path: Path, what_to_do: str = "restore it from a backup, or retrain the "
              "stage that wrote it (--retrain)") -> dict:
    """A JSON object record of a workdir (config.json, result.json, ...); a damaged one
    (truncated, not JSON, not an object) is named, with what to do."""
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        return raw
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); {what_to_do}") from None


def read_config_json(path: Path) -> dict:
    return read_json(path, "restore it from a backup or a release's config.json, or start "
                           "a new --workdir")


def load_config(workdir: Path) -> Config:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{workdir} has no config.json: not a cnneb-jax workdir")
    raw = _with_added_fields(read_config_json(path))
    fields = {f.name: f for f in dataclasses.fields(Config)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in fields}
    cfg = Config(**kw)
    try:
        validate(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path} holds an invalid config: {e}") from None
    return cfg


def write_json(path: Path, obj: Any) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_to_py))
    os.replace(tmp, path)


CLASS_NAMES_FILE = "class_names.json"


def record_classes(workdir: Path, names) -> None:
    """Stores the data's class names in the workdir; refuses data with other classes."""
    names = [str(n) for n in names]
    path = Path(workdir) / CLASS_NAMES_FILE
    if path.exists():
        theirs = read_classes(workdir)
        if theirs != names:
            raise CheckpointError(f"workdir {workdir} was trained on classes {theirs[:5]}"
                                  f"{'...' if len(theirs) > 5 else ''} ({len(theirs)}); the data "
                                  f"has {names[:5]}{'...' if len(names) > 5 else ''} "
                                  f"({len(names)}): use a new --workdir")
        return
    write_json(path, names)


def read_classes(workdir: Path) -> list[str] | None:
    """The class names stored with a workdir or release (None for older ones); a damaged
    record is named."""
    path = Path(workdir) / CLASS_NAMES_FILE
    if not path.exists():
        return None
    try:
        names = json.loads(path.read_text())
        if not isinstance(names, list):
            raise ValueError(f"a JSON {type(names).__name__}, not a list")
        return names
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); write the class folder names there "
                              "in label order (sorted), or retrain in a new workdir") from None


def log_metrics(workdir: Path, record: dict) -> None:
    """Appends `record` to metrics.jsonl and its numbers to TensorBoard (`<stage>/<key>`)."""
    if jax.process_index() != 0:  # multi-host: one log, written by the first process
        return
    with open(Path(workdir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **record}, default=_to_py) + "\n")
    tag = record.get("stage", "run") + ("/" + record["event"] if "event" in record else "")
    step = record.get("step", record.get("epoch", 0))
    write_scalars(Path(workdir) / "tensorboard", tag, int(step), _flat_numbers(record))


def _flat_numbers(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if k in ("step", "time", "stage", "event"):
            continue
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def write_scalars(logdir: Path, tag: str, step: int, values: dict[str, float]) -> None:
    """TensorBoard scalars `tag/<name>` at `step`, flushed at once (a crash loses nothing).
    Written as `tf.summary.scalar` writes them (a float tensor under the scalars plugin),
    through TensorBoard's protos and record format alone: writing them never imports
    TensorFlow (about 5 s per process here), so training from images in memory loads
    none. Skipped, with one warning, where TensorBoard is not installed: metrics.jsonl
    and sweep.json hold the same numbers."""
    if not values:
        return
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
        from tensorboard.util import tensor_util
    except ImportError as e:
        if not _WARNED:
            _WARNED.add("tensorboard")
            print(f"[tensorboard] event files skipped: {e}", file=sys.stderr)
        return
    key = str(Path(logdir).absolute())
    if key not in _WRITERS:
        Path(key).mkdir(parents=True, exist_ok=True)
        filename = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                    f"{os.getpid()}.{len(_WRITERS)}")
        _WRITERS[key] = RecordWriter(open(Path(key) / filename, "wb"))
        _WRITERS[key].write(event_pb2.Event(wall_time=time.time(),
                                            file_version="brain.Event:2").SerializeToString())
    scalars = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f"{tag}/{name}", metadata=scalars,
                                  tensor=tensor_util.make_tensor_proto(float(value), "float32"))
        for name, value in values.items()])
    _WRITERS[key].write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary).SerializeToString())
    _WRITERS[key].flush()


# One event file per log folder for the life of the process: a new file per call would
# make TensorBoard read them as separate runs.
_WRITERS: dict[str, Any] = {}
_WARNED: set[str] = set()


def _to_py(x: Any) -> Any:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    if hasattr(x, "tolist"):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")
