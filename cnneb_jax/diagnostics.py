"""What a trained backbone and its experts say about themselves on held-out images: per-class
accuracy, the most confused pairs of classes, whether the deep exit earns its cost, and
whether the learned expert ranks images better than O1's own max softmax. Each check that
fails gives a warning with what to try; the stages print them and keep them in result.json,
and the sweep repeats them beside Table 2."""

from __future__ import annotations

import jax
import numpy as np

from cnneb_jax.heads import OTHER
from cnneb_jax.metrics import ft_labels, roc_auc
from cnneb_jax.model import EXPERT_GROUPS


def paired_difference(right_a: np.ndarray, right_b: np.ndarray) -> tuple[float, float]:
    """Accuracy of a minus that of b on the same images (per image: right or not), and its
    standard error (inf for fewer than two images)."""
    d = right_a.astype(np.float64) - right_b
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    return float(d.mean()), se


def exit_gap(exits: list[np.ndarray], labels: np.ndarray) -> dict:
    """The last exit against the first on the same images: accuracies, their paired
    difference and its standard error."""
    first = exits[0].argmax(-1) == labels
    last = exits[-1].argmax(-1) == labels
    difference, se = paired_difference(last, first)
    return {"O1": float(first.mean()), f"O{len(exits)}": float(last.mean()),
            "difference": difference, "standard_error": se, "images": int(len(first))}


def exit_gap_warning(gap: dict) -> str | None:
    """A warning when the last exit is not better than O1 by more than its standard error:
    an early-exit cascade on such a backbone measures nothing (leaving early cannot cost
    accuracy), however good its sweep reads."""
    last = [k for k in gap if k.startswith("O") and k != "O1"][0]
    if gap["difference"] > gap["standard_error"]:
        return None
    return (f"{last} is not better than O1 on {gap['images']} held-out images ({last} "
            f"{gap[last]:.2%}, O1 {gap['O1']:.2%}, difference {gap['difference'] * 100:+.2f} "
            f"± {gap['standard_error'] * 100:.2f} pt): an early-exit cascade on this backbone "
            "measures nothing. Try more epochs or data, regularisation (dropout, weight "
            "decay, label smoothing), --set flip=none if a mirror image changes the class, "
            "or a pretrained backbone (train.py --init-from)")


# Above this ratio of the largest class's training images to the smallest's, a backbone
# trained without class weights favours the large classes (experiments.md §18: 10x on CIFAR-10,
# held-out balanced accuracy 44% without weights, 51% with them).
IMBALANCE_RATIO = 3.0


def imbalance_warning(labels: np.ndarray, class_names, class_balance: str) -> str | None:
    """A warning when the training classes are far from balanced and the loss is not
    weighted by class (`class_balance=none`)."""
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    present = np.nonzero(counts)[0]
    if class_balance != "none" or len(present) < 2:
        return None
    big = int(present[np.argmax(counts[present])])
    small = int(present[np.argmin(counts[present])])
    if counts[big] < IMBALANCE_RATIO * counts[small]:
        return None
    return (f"the training classes are imbalanced: {class_names[big]} has {counts[big]} images, "
            f"{class_names[small]} {counts[small]} ({counts[big] / counts[small]:.1f}x); "
            "--set class_balance=loss weights every class the same in total, which raised "
            "held-out balanced accuracy by about 7 points on a 10x imbalanced CIFAR-10 "
            "(docs/experiments.md §18)")


def class_report(logits: np.ndarray, labels: np.ndarray, class_names, worst: int = 5,
                 pairs: int = 5) -> dict:
    """Per-class accuracy of one exit, its `worst` classes, and the `pairs` pairs of classes
    it confuses most (both directions counted)."""
    names = [str(n) for n in class_names]
    pred = logits.argmax(-1)
    k = len(names)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(1)
    per_class = {names[c]: (float(confusion[c, c] / support[c]) if support[c] else None)
                 for c in range(k)}
    ranked = sorted((c for c in range(k) if support[c]), key=lambda c: per_class[names[c]])
    both = confusion + confusion.T
    iu = np.triu_indices(k, 1)
    order = np.argsort(-both[iu], kind="stable")
    confused = [{"classes": [names[iu[0][i]], names[iu[1][i]]], "errors": int(both[iu][i])}
                for i in order[:pairs] if both[iu][i] > 0]
    return {"per_class": per_class,
            "worst": [{"class": names[c], "accuracy": per_class[names[c]],
                       "images": int(support[c])} for c in ranked[:worst]],
            "confused_pairs": confused}


def format_class_report(report: dict, exit_name: str) -> str:
    worst = ", ".join(f"{w['class']} {w['accuracy']:.1%}" for w in report["worst"])
    pairs = ", ".join(f"{p['classes'][0]} <-> {p['classes'][1]} ({p['errors']})"
                      for p in report["confused_pairs"]) or "none"
    return f"{exit_name} worst classes: {worst}\n{exit_name} most confused pairs: {pairs}"


# Below this many FT examples an AUC on the calibration split says little.
MIN_FT_FOR_AUC = 10


def expert_aucs(outputs: dict, labels: np.ndarray) -> dict[str, float]:
    """ROC AUC of each expert score for Other (positive) vs FT, next to O_i's max softmax,
    for every expert kind in `outputs` ("experts", "aux5b"); and each expert's FT rate."""
    preds = [o.argmax(-1) for o in outputs["exits"]]
    out: dict[str, float] = {}
    for i in range(len(preds) - 1):
        other = ft_labels(preds, labels, i) == 0
        p_o = jax.nn.softmax(outputs["exits"][i], axis=-1)
        out[f"max_softmax_O{i + 1}"] = roc_auc(np.max(p_o, -1), other)
        for kind in (k for k in EXPERT_GROUPS if k in outputs):
            d = jax.nn.softmax(outputs[kind][i], axis=-1)
            out[f"{kind}_E{i + 1}"] = roc_auc(np.asarray(d[:, OTHER]), other)
        out[f"ft_rate_E{i + 1}"] = float(1.0 - other.mean())
    return out


def expert_vs_max_softmax(outputs: dict, labels: np.ndarray, kind: str = "experts") -> list[dict]:
    """Per expert E_i: ROC AUC (Other vs FT) of the expert's score and of O_i's max softmax
    on these images (the expert stage passes its held-out split), when they hold at least
    MIN_FT_FOR_AUC FT examples and some Other ones."""
    aucs = expert_aucs({"exits": outputs["exits"], kind: outputs[kind]}, labels)
    out = []
    for i in range(len(outputs["exits"]) - 1):
        n_ft = int(round(aucs[f"ft_rate_E{i + 1}"] * len(labels)))
        row = {"expert": f"E{i + 1}", "ft_examples": n_ft}
        if MIN_FT_FOR_AUC <= n_ft < len(labels):
            row.update(expert_auc=aucs[f"{kind}_E{i + 1}"],
                       max_softmax_auc=aucs[f"max_softmax_O{i + 1}"])
        out.append(row)
    return out


def expert_warning(row: dict) -> str | None:
    """A warning when an expert ranks the held-out images worse than O_i's max softmax,
    naming the rule to serve with. The expert trained on those images, so the comparison
    favours it."""
    if "expert_auc" not in row or row["expert_auc"] >= row["max_softmax_auc"]:
        return None
    i = row["expert"][1:]
    return (f"{row['expert']} ranks the {row['ft_examples']} FT examples of the held-out "
            f"images it trained on worse than O{i}'s max softmax (ROC AUC "
            f"{row['expert_auc']:.3f} vs "
            f"{row['max_softmax_auc']:.3f}): serve with rule max_softmax "
            "(api.calibrate(..., rule='max_softmax'), export.py --rule max_softmax)")
