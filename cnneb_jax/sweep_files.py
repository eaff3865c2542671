"""What `evaluate.py --sweep` writes besides sweep.json: Table 2 (table2.md), every point
(sweep.csv), TensorBoard scalars, and the paper's figures (PR and ROC curves of the exit
rules, accuracy against measured time, a gallery of easy and hard images)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cnneb_jax.routing import softmax
from cnneb_jax.sweep import pr_roc


RULE_NAMES = {"expert": "Proposed Expert Branch", "aux5b": "Auxiliary+5b as Expert Branch",
              "max_softmax": "Auxiliary as Expert Branch", "entropy": "Entropy of O1 (BranchyNet)",
              "oracle": "Oracle router (upper bound)"}


def rule_name(rule: str) -> str:
    """Table 2's name of a rule; "expert:<inputs>" is an ablation's expert (`--ablation`)."""
    if rule.startswith("expert:"):
        return f"Proposed Expert, inputs {rule.split(':', 1)[1]} (ablation)"
    return RULE_NAMES[rule]


def write_tensorboard(logdir: Path, points: list[dict]) -> None:
    """Each rule's sweep as TensorBoard scalars `sweep/<rule>/<name>`, one step per threshold
    (in the sweep's order), beside sweep.csv."""
    from cnneb_jax.checkpoints import write_scalars
    for rule in sorted({p["rule"] for p in points}):
        for i, p in enumerate(q for q in points if q["rule"] == rule):
            write_scalars(logdir, f"sweep/{rule}", i,
                          {k: float(p[k]) for k in ("threshold", "accuracy", "flops",
                                                     "flops_saving", "time_saving")
                           if k in p and p[k] is not None})


def write_points(out_dir: Path, points: list[dict]) -> None:
    keys = sorted({k for p in points for k in p}, key=lambda k: (k != "rule", k))
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(points)


def write_table2(path: Path, base: dict, table: list[dict], m: int,
                  alpha: float | None = None, warning: str | None = None) -> None:
    ref = base[f"O{m} only"]
    lines = ["| Method | target drop (calibration) | Accuracy | Time (ms/img, batch) "
             "| Time (ms, single: mean / p50 / p95) | Accuracy decrease "
             "| Time saving, paired (min-max) | Single saving (means), of paired O2 ms "
             "| FLOPs saving: useful / executed | Overhead: routing / fixed "
             "| Oracle FLOPs saving at same acc. "
             "| share at O1 | within target (test bootstrap) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b in base.items():
        lines.append(f"| Inception v3 {name} | - | {b['accuracy']:.2%} | {b['ms_batch']:.3f} | "
                     f"{b['ms_single']:.2f} / {b['ms_single_p50']:.2f} / "
                     f"{b['ms_single_p95']:.2f} | - | - | - | - | - | - | - |")
    for r in table:
        oracle = "-" if r["oracle_flops_saving_same_acc"] is None \
            else f"{r['oracle_flops_saving_same_acc']:.1%}"
        overhead = (f"{r['routing_overhead']:+.1%} / {r['fixed_overhead']:+.1%}"
                    if "routing_overhead" in r else "-")
        lines.append(
            f"| {rule_name(r['rule'])} | {r['target_drop'] * 100:.1f} pt | {r['accuracy']:.2%} | "
            f"{r['ms_batch']:.3f} | {r['ms_single_mean']:.2f} / {r['ms_single_p50']:.2f} / "
            f"{r['ms_single_p95']:.2f} | "
            f"{(ref['accuracy'] - r['accuracy']) * 100:.2f} pt | {r['time_saving']:.1%} "
            f"({r['time_saving_min']:.1%} to {r['time_saving_max']:.1%}) | "
            f"{r['single_saving']:.1%} of {r['ref_single_mean']:.2f} | {r['flops_saving']:.1%} / "
            f"{r['executed_flops_saving']:.1%} | {overhead} | {oracle} | {r['share_exit1']:.1%} | "
            f"{r['within_target']:.1%} |")
    how = (f"the cheapest threshold Learn-then-Test certifies on the calibration split at "
           f"alpha {alpha} (the calibration draw yields a threshold whose expected drop "
           f"exceeds the target with probability at most {alpha})"
           if alpha else "the cheapest grid point whose calibration drop meets the target, "
           "no margin")
    notes = ["",
             f"Operating points: {how}. Within target: share of bootstrap resamples of the "
             "test images whose realized drop stays within the target at that threshold "
             "(test-set noise, not the guarantee). "
             "Time saving: median over rounds of the paired ratio (point / O2 alone, timed in "
             "interleaved rounds), with its range. Single: one image at a time on test images "
             "drawn so that each exit occurs in its test share; the saving compares the means "
             "with O2 alone timed on the same images in alternating order (its mean given; the "
             "O2-only row above is timed apart and is not this reference). "
             "Executed FLOPs count bucket padding. Routing overhead: measured batch time against "
             "the time its exit shares predict from the two pure paths (all leave at O1 / none "
             "does) timed in the same rounds; fixed overhead: the path where none leaves against "
             "O2 alone, same rounds (the cost of O1's head, the rule and the host read)."]
    head = [f"**Warning (calibration split):** {warning}", ""] if warning else []
    path.write_text("\n".join(head + lines + notes) + "\n")


def plots(out_dir: Path, src: dict, y: np.ndarray, data: dict, points: list[dict],
           base: dict, m: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {r: pr_roc(o, y, base_rule) for r, (_, base_rule, o, _) in src.items()}
    fig, ax = plt.subplots(figsize=(5, 4))
    for r, cv in curves.items():
        ax.plot(cv["recall"], cv["precision"], label=rule_name(r))
    _finish(fig, ax, out_dir / "pr.png", "recall (Other)", "precision (Other)",
            "Experts at branch 1: precision vs recall")

    fig, ax = plt.subplots(figsize=(5, 4))
    for r, cv in curves.items():
        ax.plot(cv["fpr"], cv["tpr"], label=f"{rule_name(r)} (AUC {cv['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    _finish(fig, ax, out_dir / "roc.png", "false positive rate", "true positive rate",
            "Experts at branch 1: ROC (Other positive)")

    ref = base[f"O{m} only"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in src:
        pts = [p for p in points if p["rule"] == r and "ms_batch" in p]
        ax.plot([p["ms_batch"] for p in pts], [p["accuracy"] for p in pts], "o-", ms=3,
                label=rule_name(r))
    orc = [p for p in points if p["rule"] == "oracle"]
    ax.plot([ref["ms_batch"] * p["flops"] / ref["flops"] for p in orc],
            [p["accuracy"] for p in orc], "k--", lw=1, label="Oracle (time from FLOPs)")
    b1, b2 = base["O1 only"], ref
    ax.plot([b1["ms_batch"], b2["ms_batch"]], [b1["accuracy"], b2["accuracy"]], ":", c="gray",
            label="linear O1 only - O2 only")
    ax.plot([b1["ms_batch"]], [b1["accuracy"]], "s", c="gray")
    ax.plot([b2["ms_batch"]], [b2["accuracy"]], "D", c="black")
    _finish(fig, ax, out_dir / "acc_vs_time.png", "measured time per image, batch mode (ms)",
            "test accuracy", "Accuracy vs time")

    _gallery(out_dir / "gallery.png", src["expert"][2], y, data["test_images"],
             data["class_names"])


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _gallery(path: Path, out: dict, y: np.ndarray, images: np.ndarray, names) -> None:
    import matplotlib.pyplot as plt
    p1 = out["exits"][0].argmax(-1)
    p2 = out["exits"][-1].argmax(-1)
    conf1 = softmax(out["exits"][0]).max(-1)
    classes = list(range(min(5, len(names))))
    per = 3
    fig, axes = plt.subplots(len(classes), 2 * per, figsize=(2 * per * 1.2, len(classes) * 1.3))
    for r, cls in enumerate(classes):
        easy = np.nonzero((y == cls) & (p1 == y) & (p2 == y))[0]
        easy = easy[np.argsort(-conf1[easy])][:per]
        hard = np.nonzero((y == cls) & (p1 != y) & (p2 == y))[0][:per]
        for k in range(2 * per):
            ax = axes[r, k]
            ax.axis("off")
            idx = easy if k < per else hard
            j = k % per
            if j < len(idx):
                ax.imshow(images[idx[j]])
                if k >= per:
                    ax.set_title(f"O1: {names[p1[idx[j]]]}"[:14], fontsize=6)
        axes[r, 0].set_title(str(names[cls]), fontsize=7, loc="left")
    fig.suptitle("left: easy (O1 and O2 right) | right: hard (only O2 right)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
