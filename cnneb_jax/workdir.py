"""A workdir: its stages' folders, what they finished with, and reading a trained one for
inference.

    <workdir>/config.json, class_names.json
    <workdir>/backbone/{ckpt/, result.json}   (or backbone_from.json: a linked backbone)
    <workdir>/expert/{ckpt/, result.json}

Reading a workdir restores the evaluation variables alone (parameters and BatchNorm
statistics, the EMA's where the stage kept one), never the optimizer state: a change to an
optimizer cannot make old workdirs unreadable. A release folder (release.py) is read
wherever a workdir is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from cnneb_jax import checkpoints as ckpt
from cnneb_jax import lineage, release
from cnneb_jax.configs import Config
from cnneb_jax.model import (BACKBONE_GROUPS, EXPERT_GROUPS, Model, Variables,
                             abstract_variables, build_model, merge_collections,
                             split_collections)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, missing earlier stage)."""


def subset(tree: Variables, groups: tuple[str, ...]) -> Variables:
    return {g: tree[g] for g in groups}


def stage_done(stage_dir: Path) -> dict | None:
    """The stage's result.json when it finished, else None."""
    path = stage_dir / "result.json"
    if path.exists():
        return ckpt.read_json(path)
    return None


def begin_stage(cfg: Config, workdir: Path, stage: str, retrain: bool,
                class_names=None) -> dict | None:
    """Checks the workdir's config (and class names); returns the stage's result if it
    already finished (and `retrain` is off); with `retrain`, removes the stage's
    checkpoints (and moves aside the experts a retrained backbone no longer fits)."""
    ckpt.check_config(workdir, cfg)
    if class_names is not None:
        ckpt.record_classes(workdir, class_names)
    stage_dir = workdir / stage
    done = stage_done(stage_dir)
    if done is not None and not retrain:
        print(f"[{stage}] already trained in {stage_dir} (use --retrain to train again)")
        return done
    if retrain and stage_dir.exists():
        shutil.rmtree(stage_dir)
    dependent = workdir / "expert"
    if stage == "backbone" and retrain and dependent.exists():
        aside = workdir / f"expert.stale-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(dependent, aside)
        print(f"[backbone] --retrain: the expert stage trained on the old backbone no longer "
              f"fits it; moved to {aside} (train it again with --stage expert)")
    return None


def restore_eval(stage_dir: Path, params: Variables, stats: Variables,
                 ema: bool = False) -> Variables:
    """The evaluation variables of a finished stage's latest checkpoint: its EMA's when
    `ema`, else its parameters and statistics; the optimizer state is not read. `params`
    and `stats` may be abstract (jax.eval_shape): only their structure is used."""
    part = {"params": params, "stats": stats}
    like = {"ema": part} if ema else part
    mngr = ckpt.manager(stage_dir)
    try:
        restored = ckpt.restore_latest(mngr, like, partial=True)
    finally:
        mngr.close()
    if restored is None:
        raise TrainingError(f"{stage_dir} has no checkpoint")
    state = restored[1]
    src = state["ema"] if ema else state
    return merge_collections(src["params"], src["stats"])


# The fields only the expert stage reads: a workdir whose backbone comes from another
# (`link_backbone`) may differ from that one in these alone.
EXPERT_STAGE_FIELDS = ("name", "seed", "expert_hidden", "expert_inputs", "expert_epochs",
                       "expert_batch_size", "expert_lr", "aux5b_lr", "aux5b_epochs",
                       "expert_weight_decay", "expert_views")
BACKBONE_LINK = "backbone_from.json"


def link_backbone(cfg: Config, workdir: str | Path, source: str | Path) -> None:
    """Makes a new workdir take its backbone from `source` (a workdir with a finished
    backbone stage, or a release folder) instead of training one, so that experts of
    another kind (e.g. `expert_inputs`, an ablation) are trained on the very same frozen
    backbone and held-out split. The configs may differ only in EXPERT_STAGE_FIELDS. The
    link is stored relative to the workdir, so the two can move together."""
    workdir, source = Path(workdir), Path(source)
    if (workdir / "backbone").exists():
        raise TrainingError(f"{workdir} has a backbone stage of its own; take a backbone "
                            "from another workdir only into a new workdir")
    if source.resolve() == workdir.resolve():
        raise TrainingError("a workdir cannot take its backbone from itself")
    ckpt.load_config(source)   # refuses a folder that is not a workdir or release
    if not release.is_release(source) and stage_done(source / "backbone") is None:
        raise TrainingError(f"{source} has no finished backbone stage")
    diff = ckpt.config_diff(source, cfg, ignore=EXPERT_STAGE_FIELDS)
    if diff:
        raise TrainingError(f"the backbone of {source} was trained with another config "
                            f"({diff}); only the expert stage's fields may differ: "
                            + ", ".join(EXPERT_STAGE_FIELDS))
    rel = os.path.relpath(source.resolve(), workdir.resolve())
    linked = backbone_source(workdir)
    if linked is not None and linked != source.resolve():
        raise TrainingError(f"{workdir} already takes its backbone from {linked}")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(workdir / BACKBONE_LINK, {"path": rel})


def backbone_source(workdir: str | Path) -> Path | None:
    """Where a workdir's backbone comes from when `link_backbone` linked it, else None."""
    link = Path(workdir) / BACKBONE_LINK
    if not link.exists():
        return None
    return (Path(workdir).resolve() / json.loads(link.read_text())["path"]).resolve()


def check_data_lineage(workdir: str | Path, data: dict, doing: str) -> None:
    """Refuses data other than what the workdir's backbone trained on (see lineage.py)."""
    workdir = Path(workdir)
    lineage.check_data((backbone_source(workdir) or workdir) / "backbone",
                       data.get("identity"), doing)


def load_backbone(workdir: str | Path, cfg: Config) -> tuple[Model, Variables]:
    """The finished backbone of a workdir (segments and exits, eval-ready), or of the
    workdir or release it is linked to."""
    workdir = Path(workdir)
    source = backbone_source(workdir)
    if source is not None:
        if not source.exists():
            raise TrainingError(f"{workdir} takes its backbone from {source}, which is gone")
        if release.is_release(source):
            return build_model(cfg), subset(release.load_release(source)[1], BACKBONE_GROUPS)
        return load_backbone(source, cfg)
    if stage_done(workdir / "backbone") is None:
        raise TrainingError(f"{workdir} has no finished backbone stage; "
                            "run `python train.py --stage backbone` first")
    model = build_model(cfg)
    params, stats = split_collections(subset(abstract_variables(model, cfg.seed),
                                             BACKBONE_GROUPS))
    return model, restore_eval(workdir / "backbone", params, stats, ema=cfg.ema_decay > 0)


def load_trained(workdir: str | Path) -> tuple[Model, Variables]:
    """Backbone and experts of a finished workdir (or a release folder, see release.py),
    for evaluation and the API."""
    workdir = Path(workdir)
    if release.is_release(workdir):
        return release.load_release(workdir)
    cfg = ckpt.load_config(workdir)
    model, backbone = load_backbone(workdir, cfg)
    lineage.check_experts_match(workdir, backbone)
    if stage_done(workdir / "expert") is None:
        raise TrainingError(f"{workdir} has no finished expert stage; "
                            "run `python train.py --stage expert` first")
    params, stats = split_collections(subset(abstract_variables(model, cfg.seed + 1),
                                             EXPERT_GROUPS))
    return model, {**backbone, **restore_eval(workdir / "expert", params, stats)}


def save_release(workdir: str | Path, out: str | Path, command: str, test_dir: str | Path,
                 per_class: int = 50) -> dict:
    """Writes the release folder `out` from a finished workdir; returns its release.json."""
    workdir, out = Path(workdir), Path(out)
    # A workdir trained with --backbone-from has its backbone's result where that came from.
    done_in = {"backbone": backbone_source(workdir) or workdir, "expert": workdir}
    model, variables = load_trained(workdir)
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)
    out.mkdir(parents=True, exist_ok=True)
    (out / release.VARIABLES_FILE).write_bytes(serialization.msgpack_serialize(variables))
    shutil.copy(workdir / "config.json", out / "config.json")
    if (workdir / ckpt.CLASS_NAMES_FILE).exists():
        shutil.copy(workdir / ckpt.CLASS_NAMES_FILE, out / ckpt.CLASS_NAMES_FILE)
    for stage in ("backbone", "expert"):
        (out / stage).mkdir(exist_ok=True)
        shutil.copy(done_in[stage] / stage / "result.json", out / stage / "result.json")
    files, labels = release.reference_files(test_dir, per_class)
    meta = {
        "command": command,
        "source_workdir": str(workdir),
        "test_accuracy": json.loads((done_in["backbone"] / "backbone" / "result.json").read_text())
        ["test_accuracy"],
        "reference": {"per_class": per_class, "images": len(files),
                      "accuracy": release.exit_accuracy_on(model, variables,
                                                           release.read_images(files), labels)},
    }
    ckpt.write_json(out / "release.json", meta)
    return meta
