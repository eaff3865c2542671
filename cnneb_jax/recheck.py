"""bfloat16 with a float32 second look at its close calls (`compute_dtype="bfloat16_checked"`).

bfloat16 everywhere moves the shipped model's labels on 0.3-0.4% of the test images, and
those are the images whose top two classes lie close together (docs/experiments.md §22,
§31). A checked cascade routes and answers in bfloat16, then reruns in float32, up to the
exit that answered, every image whose top-2 softmax margin at that exit falls below the
exit's threshold. The thresholds are chosen on held-out images (`choose_margins`) and kept
beside the workdir (`api.recheck_path`). The routing decisions themselves stay bfloat16's:
an image near the expert's threshold may leave at the other exit than in float32.

numpy only; the reruns are the controller's (`controller.run_cascade`, `all_outputs`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from cnneb_jax.routing import softmax

CHECKED = "bfloat16_checked"   # the compute dtype api.load and evaluate.py accept for it
RECHECK_FILE = "precision_check.json"


@dataclasses.dataclass(frozen=True)
class Recheck:
    """What a bfloat16 cascade needs to rerun its close calls: the float32 cascade (a
    `programs.Cascade` of the same variables) and each exit's margin threshold."""
    reference: Any
    margins: tuple[float, ...]


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Softmax probability of the top class minus that of the second, per row."""
    p = np.sort(softmax(np.asarray(logits, np.float32)), -1)
    return p[:, -1] - p[:, -2]


def close_calls(logits: np.ndarray, margin: float) -> np.ndarray:
    """The rows whose top-2 margin falls below `margin`: those to rerun in float32."""
    return top2_margin(logits) < margin


def choose_margin(low: np.ndarray, ref: np.ndarray, target: float) -> float:
    """The smallest threshold at which bfloat16 logits `low`, their close calls replaced by
    float32's, give the labels of float32 logits `ref` on at least `target` of the rows.
    Rows whose labels differ must be rerun, all but floor((1 - target) * n) of them, those
    with the largest margins left out; the threshold sits just above the largest margin
    that must be caught (0 when none must)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target agreement must be in (0, 1]; got {target}")
    differ = np.sort(top2_margin(low)[low.argmax(-1) != ref.argmax(-1)])[::-1]
    allowed = math.floor((1.0 - target) * len(low) + 1e-9)
    if len(differ) <= allowed:
        return 0.0
    return float(np.nextafter(np.float32(differ[allowed]), np.float32(np.inf)))


def choose_margins(low: list[np.ndarray], ref: list[np.ndarray], target: float) -> dict:
    """Each exit's threshold (`choose_margin`) from bfloat16 and float32 logits of the same
    held-out images, with what it gives on them: the share of rows rerun, and the labels
    equal to float32's before and after the recheck."""
    margins, rerun, before, after = [], [], [], []
    for lo, re in zip(low, ref):
        t = choose_margin(lo, re, target)
        again = close_calls(lo, t)
        same = lo.argmax(-1) == re.argmax(-1)
        margins.append(t)
        rerun.append(float(again.mean()))
        before.append(float(same.mean()))
        after.append(float((same | again).mean()))
    return {"dtype": CHECKED, "target": target, "images": int(len(low[0])),
            "margins": margins, "heldout_rerun": rerun,
            "heldout_same_label_bfloat16": before, "heldout_same_label_checked": after}


def read_margins(point: dict, num_exits: int) -> tuple[float, ...]:
    """The thresholds of a stored check, refused if it does not fit the model."""
    margins = point.get("margins")
    if (not isinstance(margins, list) or len(margins) != num_exits
            or not all(isinstance(m, (int, float)) and 0.0 <= m <= 1.0 for m in margins)):
        raise ValueError(f"a precision check needs one margin in [0, 1] per exit "
                         f"({num_exits}); got {margins!r}")
    return tuple(float(m) for m in margins)
