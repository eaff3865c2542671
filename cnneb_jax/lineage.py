"""What each stage of a workdir was built from, so that nothing stale is mixed silently.

The backbone stage's result.json records the data it trained on (`data`: the identity
`data.load_dataset` gives: class folder, name and size of every file, or the tfds name and
version) and a digest of the variables it ended with (`variables_sha256`). The expert stage
records the backbone digest and the data it trained on (`backbone_sha256`, `data`, also in
`expert/lineage.json` from its first step, so a resumed run is checked too). Loading a
workdir compares them: experts of an older backbone, or data other than the backbone's,
are refused with a message that says which and what to do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnneb_jax import checkpoints as ckpt

LINEAGE_FILE = "lineage.json"


class LineageError(ValueError):
    """A stage built from something other than what it is now combined with."""


def variables_digest(tree: Any) -> str:
    """sha256 of a variables tree: every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in blocks: the weights a stage started from, a release."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recorded(stage_dir: Path, key: str) -> str | None:
    path = Path(stage_dir) / "result.json"
    return ckpt.read_json(path).get(key) if path.exists() else None


def check_data(stage_dir: Path, identity: str | None, doing: str) -> None:
    """Refuses data other than what the stage in `stage_dir` was trained on (stages from
    before the record, or data without an identity, pass)."""
    theirs = _recorded(stage_dir, "data")
    if theirs is None or identity is None or theirs == identity:
        return
    raise LineageError(
        f"{stage_dir} was trained on other data (identity {theirs}) than these ({identity}): "
        f"{doing} on them would mix images the backbone trained on into the held-out ones. "
        "Give the same --data-dir (and --val-dir) as in training, or retrain with --retrain")


def check_expert_start(stage_dir: Path, backbone_sha: str, identity: str | None) -> None:
    """An expert stage resumed on another backbone or other data is refused; a new one
    records what it starts from."""
    path = Path(stage_dir) / LINEAGE_FILE
    mine = {"backbone_sha256": backbone_sha, "data": identity}
    if path.exists():
        theirs = ckpt.read_json(path)
        for key, value in mine.items():
            if theirs.get(key) not in (None, value):
                raise LineageError(
                    f"{stage_dir} started on another {key.split('_')[0]} ({key} "
                    f"{str(theirs[key])[:12]}, now {str(value)[:12]}): its checkpoints do not "
                    "belong to it; --retrain to train the experts again")
        return
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    ckpt.write_json(path, mine)


def check_experts_match(workdir: Path, backbone: Any) -> None:
    """Refuses a workdir whose experts were trained on a backbone other than its own
    (retrained since, or a link changed)."""
    theirs = _recorded(Path(workdir) / "expert", "backbone_sha256")
    if theirs is None:
        return
    now = variables_digest(backbone)
    if now != theirs:
        raise LineageError(
            f"the experts in {Path(workdir) / 'expert'} were trained on another backbone "
            f"(sha256 {theirs[:12]}) than the one {workdir} has now ({now[:12]}): train them "
            "again with `train.py --stage expert --retrain`")
