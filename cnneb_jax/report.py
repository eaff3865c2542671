"""`evaluate.py --sweep`: measure every rule over a threshold grid and write Table 2,
the paper's figures, and every point as CSV/JSON.

Accuracy, exit shares and FLOPs of every grid point come from the outputs of every exit
(exact, see sweep.py). Time is measured by running the real cascade: batch mode (images/s,
median of repeats after warm-up) on a timing subset, and single-image latency on a few images.
Operating points are chosen on the calibration split (held out from training, never seen
by the experts) and then measured on test.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cnneb_jax.controller import (Cascade, all_outputs, first_exit_flops,
                                  last_exit_flops, path_flops, run_cascade, run_plain,
                                  softmax_np, step_flops)
from cnneb_jax.diagnostics import exit_gap, exit_gap_warning
from cnneb_jax.guarantee import choose_threshold_guaranteed, within_target_share
from cnneb_jax.sweep import (EXPERT_RULES, branch_scores, choose_threshold, evaluate_point,
                             pr_roc, sweep_rule, threshold_grid)

RULE_NAMES = {"expert": "Proposed Expert Branch", "aux5b": "Auxiliary+5b as Expert Branch",
              "max_softmax": "Auxiliary as Expert Branch", "entropy": "Entropy of O1 (BranchyNet)",
              "oracle": "Oracle router (upper bound)"}
DROPS = (0.005, 0.01, 0.02)


def rule_name(rule: str) -> str:
    """Table 2's name of a rule; "expert:<inputs>" is an ablation's expert (`--ablation`)."""
    if rule.startswith("expert:"):
        return f"Proposed Expert, inputs {rule.split(':', 1)[1]} (ablation)"
    return RULE_NAMES[rule]


def median_seconds(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def time_batch(c: Cascade, images: np.ndarray, run, repeats: int) -> float:
    """Milliseconds per image in batch mode (median over repeats, after one warm pass)."""
    run(images[:c.max_batch])
    return 1000.0 * median_seconds(lambda: run(images), repeats) / len(images)


def _latency(ms: list[float], prefix: str) -> dict[str, float]:
    ms = np.asarray(ms)
    return {f"{prefix}_mean": float(ms.mean()), f"{prefix}_p50": float(np.median(ms)),
            f"{prefix}_p95": float(np.percentile(ms, 95))}


def time_single(images: np.ndarray, run) -> dict[str, float]:
    """Milliseconds for one image at a time: mean (`ms_single`), median and p95."""
    run(images[:1])
    stats = _latency([1000.0 * _seconds(run, x[None]) for x in images], "ms_single")
    stats["ms_single"] = stats.pop("ms_single_mean")
    return stats


def _seconds(run, x) -> float:
    t = time.perf_counter()
    run(x)
    return time.perf_counter() - t


def paired_batch(images: np.ndarray, runs: dict, repeats: int) -> dict[str, np.ndarray]:
    """Seconds per image of every run, timed in interleaved rounds (A B C A B C ...), so
    that a machine whose speed drifts slows all of them alike; one array per run, one entry
    per round. Each run is warmed once first."""
    for run in runs.values():
        run(images[:len(images) // 4 or 1])
    out = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            out[k].append(_seconds(run, images) / len(images))
    return {k: np.array(v) for k, v in out.items()}


def paired_single(images: np.ndarray, run_ref, run_point) -> dict[str, float]:
    """Single-image latency (ms) of a point and of the reference on the same images, each
    image timed with both in alternating order. Latency is bimodal (leave at O1 or go deep),
    so mean, median and p95 are all reported; pass images in which both paths occur in
    their true share (`stratified`)."""
    run_ref(images[:1])
    run_point(images[:1])
    ref, pt = [], []
    for i, x in enumerate(images):
        pair = [(ref, run_ref), (pt, run_point)]
        for store, run in (pair if i % 2 == 0 else pair[::-1]):
            store.append(1000.0 * _seconds(run, x[None]))
    return {**_latency(pt, "ms_single"), **_latency(ref, "ref_single"),
            "single_saving": float(1.0 - np.mean(pt) / np.mean(ref))}


def stratified(exits: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of n samples whose exits occur in the same shares as in `exits` (largest
    remainder rounding), drawn at random inside each exit."""
    rng = np.random.default_rng(seed)
    n = min(n, len(exits))
    values, counts = np.unique(exits, return_counts=True)
    quota = counts / counts.sum() * n
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take))[:n - take.sum()]] += 1
    idx = [rng.choice(np.nonzero(exits == v)[0], k, replace=False) for v, k in zip(values, take)]
    return rng.permutation(np.concatenate(idx))


def executed_flops(c: Cascade, rows_run: np.ndarray, n: int, rule: str) -> float:
    """FLOPs per image of `n` that the controller really ran, bucket padding included:
    program i ran segment and exit i (and the rule at a branch point) on `rows_run[i]`
    rows (what `run_cascade` returns)."""
    segs, heads, rule_cost = step_flops(c, rule)
    per_row = [segs[i] + heads[i] + rule_cost[i] for i in range(len(segs))]
    return float(np.dot(rows_run, per_row)) / n


def _write_tensorboard(logdir: Path, points: list[dict]) -> None:
    """Each rule's sweep as TensorBoard scalars `sweep/<rule>/<name>`, one step per threshold
    (in the sweep's order), beside sweep.csv."""
    from cnneb_jax.checkpoints import write_scalars
    for rule in sorted({p["rule"] for p in points}):
        for i, p in enumerate(q for q in points if q["rule"] == rule):
            write_scalars(logdir, f"sweep/{rule}", i,
                          {k: float(p[k]) for k in ("threshold", "accuracy", "flops",
                                                     "flops_saving", "time_saving")
                           if k in p and p[k] is not None})


def sweep(c: Cascade, data: dict, out_dir: Path, repeats: int = 3, timing_images: int = 2000,
          single_images: int = 50, timed_points: int = 9, alpha: float | None = 0.1,
          resamples: int = 1000, ablations: dict[str, Cascade] | None = None) -> dict:
    """Every rule over its grid, then Table 2. With `alpha` each operating point is the
    cheapest threshold Learn-then-Test certifies on the calibration split (the test drop
    exceeds the target with probability at most alpha, `guarantee.py`); with alpha None or 0,
    the cheapest point of a 41-quantile grid whose calibration drop meets the target (no
    margin). Each row reports the share of `resamples` bootstrap resamples of the test
    images on which the realized drop stays within the target.

    `ablations` maps a name to a cascade with the same backbone and other experts (trained
    with `train.py --backbone-from`); its expert becomes the rule "expert:<name>", swept,
    calibrated and timed beside the others."""
    if alpha is not None and not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (0: no guarantee), got {alpha}")
    out_dir.mkdir(parents=True, exist_ok=True)
    x_test, y_test = data["test_images"], data["test_labels"]
    x_cal, y_cal = data["calib_images"], data["calib_labels"]
    x_time = x_test[:timing_images]
    x_single = x_test[:single_images]
    print(f"[sweep] outputs of every exit: test {len(x_test)}, calibration {len(x_cal)}")
    out_test = all_outputs(c, x_test)
    out_cal = all_outputs(c, x_cal)
    m = c.model.num_exits
    acc = [float((o.argmax(-1) == y_test).mean()) for o in out_test["exits"]]
    # rule -> (the cascade that routes it, its rule there, test outputs, calibration outputs)
    src = {r: (c, r, out_test, out_cal) for r in EXPERT_RULES}
    for name, ca in (ablations or {}).items():
        print(f"[sweep] outputs of the ablation {name!r}")
        src[f"expert:{name}"] = (ca, "expert", all_outputs(ca, x_test), all_outputs(ca, x_cal))
        same_backbone(out_test, src[f"expert:{name}"][2], name)
    f_o1, f_last = first_exit_flops(c), last_exit_flops(c)

    print("[sweep] timing the plain networks (O1 only, last exit only)")
    base = {}
    for name, idx, flops in (("O1 only", 0, f_o1), (f"O{m} only", m - 1, f_last)):
        run = lambda x, i=idx: run_plain(c, x, i)
        base[name] = {"accuracy": acc[idx], "flops": flops,
                      "ms_batch": time_batch(c, x_time, run, repeats),
                      **time_single(x_single, run)}
    ref = base[f"O{m} only"]
    ref_run = lambda x: run_plain(c, x, m - 1)

    points: list[dict] = []
    swept = {**src, "oracle": (c, "oracle", out_test, out_cal)}
    costs_of = {r: path_flops(cc, base_rule) for r, (cc, base_rule, _, _) in swept.items()}
    for rule, (_, base_rule, o_test, _) in swept.items():
        grid = threshold_grid(branch_scores(o_test, base_rule, y_test))
        if rule == "oracle":
            # FT samples are a few percent: quantiles alone would step over them in one go.
            grid = np.unique(np.concatenate([grid, np.linspace(0, 0.5, 201)]))
        points += [{**p, "rule": rule} for p in sweep_rule(o_test, y_test, base_rule,
                                                            costs_of[rule], grid)]
    # Wall-clock on a subset of each rule's grid (the oracle is a bound: FLOPs only).
    timed = [p for rule in src for p in _spread([q for q in points if q["rule"] == rule],
                                                   timed_points)]
    y_time = y_test[:len(x_time)]
    out_time = _head_rows(out_test, len(x_time))
    scores_time = {r: branch_scores(_head_rows(o, len(x_time)), base_rule)
                   for r, (_, base_rule, o, _) in src.items()}
    for p in tqdm(timed, desc="timing sweep points"):
        cc, base_rule = src[p["rule"]][:2]
        run = lambda x, p=p, cc=cc, r=base_rule: run_cascade(cc, x, r, p["threshold"])
        p["ms_batch"] = time_batch(c, x_time, run, repeats)
        p["flops_timing_subset"] = evaluate_point(out_time, y_time, scores_time[p["rule"]],
                                                  p["threshold"], costs_of[p["rule"]])["flops"]
    for p in points:
        p["flops_saving"] = 1.0 - p["flops"] / ref["flops"]
        if "ms_batch" in p:
            p["time_saving"] = 1.0 - p["ms_batch"] / ref["ms_batch"]
            # > 1 means routing, gathering and padding cost more than the FLOPs say.
            p["time_over_flops"] = ((p["ms_batch"] / ref["ms_batch"])
                                    / (p["flops_timing_subset"] / ref["flops"]))

    how = f"certified at alpha {alpha}" if alpha else "fitted, no margin"
    print(f"[sweep] operating points chosen on the calibration split ({how}), measured on test")
    table = []
    oracle_pts = [p for p in points if p["rule"] == "oracle"]
    cal_ref = float((out_cal["exits"][-1].argmax(-1) == y_cal).mean())
    # The no-margin fit's grid on calibration; certified points search every score instead.
    cal_pts_of = {} if alpha else {r: sweep_rule(o_cal, y_cal, base_rule, costs_of[r])
                                   for r, (_, base_rule, _, o_cal) in src.items()}
    scores_test = {r: branch_scores(o, base_rule) for r, (_, base_rule, o, _) in src.items()}
    last_right = out_test["exits"][-1].argmax(-1) == y_test
    for drop in DROPS:
        for rule, (cc, base_rule, _, o_cal) in src.items():
            costs = costs_of[rule]
            if alpha:
                chosen = choose_threshold_guaranteed(o_cal, y_cal, base_rule, costs, drop, alpha)
            else:
                chosen = choose_threshold(cal_pts_of[rule], cal_ref, max_drop=drop)
            if chosen is None:
                continue
            t = chosen["threshold"]
            # The real cascade on the whole test split.
            real = run_cascade(cc, x_test, base_rule, t)
            test_acc = float((real["logits"].argmax(-1) == y_test).mean())
            run = lambda x, cc=cc, r=base_rule, t=t: run_cascade(cc, x, r, t)
            row = {"rule": rule, "target_drop": drop, "threshold": t, "accuracy": test_acc,
                   "flops": float(real["flops"].mean()),
                   "executed_flops": executed_flops(cc, real["rows_run"], len(x_test),
                                                    base_rule),
                   "share_exit1": float((real["exit"] == 0).mean()),
                   "alpha": alpha or None, "drop_ucb": chosen.get("drop_ucb"),
                   "within_target": within_target_share(
                       last_right, real["logits"].argmax(-1) == y_test, drop, resamples)}
            # Batch mode, paired: the reference, the point and the point's two pure paths
            # (every sample leaves at O1 / none does, same rule) in interleaved rounds.
            runs = {"ref": ref_run, "point": run}
            if m == 2:
                runs.update(all_leave=lambda x, cc=cc, r=base_rule: run_cascade(cc, x, r, -1.0),
                            none_leave=lambda x, cc=cc, r=base_rule: run_cascade(cc, x, r, 2.0))
            sec = paired_batch(x_time, runs, repeats)
            ratio = sec["point"] / sec["ref"]
            row.update({"ms_batch": 1e3 * float(np.median(sec["point"])),
                        "ref_ms_batch": 1e3 * float(np.median(sec["ref"])),
                        "time_saving": float(1 - np.median(ratio)),
                        "time_saving_min": float(1 - ratio.max()),
                        "time_saving_max": float(1 - ratio.min())})
            # Batch-mode time is measured on the timing subset: compare with its FLOPs.
            exits_sub = real["exit"][:len(x_time)]
            f_sub = evaluate_point(out_time, y_time, scores_time[rule], t, costs)["flops"]
            row["time_over_flops"] = float(np.median(ratio)) / (f_sub / ref["flops"])
            if m == 2:
                # Routing overhead: measured time against the time its two paths predict
                # for this mix of exits (segments run at different GFLOP/s on a CPU, so a
                # FLOPs line cannot separate overhead from hardware efficiency).
                s1 = float((exits_sub == 0).mean())
                pred = s1 * sec["all_leave"] + (1 - s1) * sec["none_leave"]
                row["routing_overhead"] = float(np.median(sec["point"] / pred) - 1)
            idx = stratified(real["exit"], len(x_single))
            row.update(paired_single(x_test[idx], lambda x: run_plain(c, x, m - 1), run))
            row["ms_single"] = row["ms_single_mean"]
            row["flops_saving"] = 1 - row["flops"] / ref["flops"]
            row["executed_flops_saving"] = 1 - row["executed_flops"] / ref["flops"]
            # Consistency: the real cascade's accuracy equals the one the exit outputs give.
            row["accuracy_from_outputs"] = evaluate_point(
                out_test, y_test, scores_test[rule], t, costs)["accuracy"]
            o = choose_threshold(oracle_pts, test_acc, flops_budget=None, max_drop=0.0)
            row["oracle_flops_saving_same_acc"] = (1 - o["flops"] / ref["flops"]) if o else None
            table.append(row)

    result = {"exits_accuracy": acc, "baselines": base, "table2": table, "points": points,
              "flops": c.flops, "repeats": repeats, "timing_images": len(x_time),
              "single_images": len(x_single), "alpha": alpha or None, "resamples": resamples}
    # Beside Table 2: does the deep exit earn its cost on held-out images at all?
    gap = exit_gap(out_cal["exits"], y_cal)
    result["calibration_exit_gap"] = gap
    warning = exit_gap_warning(gap)
    if warning:
        result["warning"] = warning
        print(f"warning: {warning}", file=sys.stderr)
    _write_points(out_dir, points)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    _write_tensorboard(out_dir / "tensorboard", points)
    _write_table2(out_dir / "table2.md", base, table, m, alpha or None, warning)
    _plots(out_dir, src, y_test, data, points, base, m)
    return result


def same_backbone(out: dict, out_other: dict, name: str, atol: float = 1e-4) -> None:
    """Refuses an ablation whose exits do not give the same outputs: its expert would be
    compared on another backbone."""
    for i, (a, b) in enumerate(zip(out["exits"], out_other["exits"])):
        if a.shape != b.shape or not np.allclose(a, b, atol=atol):
            raise ValueError(f"the ablation {name!r} does not share the backbone: O{i + 1} "
                             "gives other outputs (train it with train.py --backbone-from)")


def _head_rows(outputs: dict, n: int) -> dict:
    return {k: [a[:n] for a in v] for k, v in outputs.items()}


def _spread(pts: list[dict], k: int) -> list[dict]:
    idx = np.unique(np.linspace(0, len(pts) - 1, k).round().astype(int))
    return [pts[i] for i in idx]


def _write_points(out_dir: Path, points: list[dict]) -> None:
    keys = sorted({k for p in points for k in p}, key=lambda k: (k != "rule", k))
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(points)


def _write_table2(path: Path, base: dict, table: list[dict], m: int,
                  alpha: float | None = None, warning: str | None = None) -> None:
    ref = base[f"O{m} only"]
    lines = ["| Method | target drop (calibration) | Accuracy | Time (ms/img, batch) "
             "| Time (ms, single: mean / p50 / p95) | Accuracy decrease "
             "| Time saving, paired (min-max) | Single saving (means) "
             "| FLOPs saving: useful / executed | Routing overhead | Oracle FLOPs saving at same acc. "
             "| share at O1 | within target (test bootstrap) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b in base.items():
        lines.append(f"| Inception v3 {name} | - | {b['accuracy']:.2%} | {b['ms_batch']:.3f} | "
                     f"{b['ms_single']:.2f} / {b['ms_single_p50']:.2f} / "
                     f"{b['ms_single_p95']:.2f} | - | - | - | - | - | - | - |")
    for r in table:
        oracle = "-" if r["oracle_flops_saving_same_acc"] is None \
            else f"{r['oracle_flops_saving_same_acc']:.1%}"
        overhead = f"{r['routing_overhead']:+.1%}" if "routing_overhead" in r else "-"
        lines.append(
            f"| {rule_name(r['rule'])} | {r['target_drop'] * 100:.1f} pt | {r['accuracy']:.2%} | "
            f"{r['ms_batch']:.3f} | {r['ms_single_mean']:.2f} / {r['ms_single_p50']:.2f} / "
            f"{r['ms_single_p95']:.2f} | "
            f"{(ref['accuracy'] - r['accuracy']) * 100:.2f} pt | {r['time_saving']:.1%} "
            f"({r['time_saving_min']:.1%} to {r['time_saving_max']:.1%}) | "
            f"{r['single_saving']:.1%} | {r['flops_saving']:.1%} / "
            f"{r['executed_flops_saving']:.1%} | {overhead} | {oracle} | {r['share_exit1']:.1%} | "
            f"{r['within_target']:.1%} |")
    how = (f"the cheapest threshold Learn-then-Test certifies on the calibration split at "
           f"alpha {alpha} (the test drop exceeds the target with probability at most {alpha})"
           if alpha else "the cheapest grid point whose calibration drop meets the target, "
           "no margin")
    notes = ["",
             f"Operating points: {how}. Within target: share of bootstrap resamples of the "
             "test images whose realized drop stays within the target. "
             "Time saving: median over rounds of the paired ratio (point / O2 alone, timed in "
             "interleaved rounds), with its range. Single: one image at a time on test images "
             "drawn so that each exit occurs in its test share; the saving compares the means. "
             "Executed FLOPs count bucket padding. Routing overhead: measured batch time against "
             "the time its exit shares predict from the two pure paths (all leave at O1 / none "
             "does) timed in the same rounds."]
    head = [f"**Warning (calibration split):** {warning}", ""] if warning else []
    path.write_text("\n".join(head + lines + notes) + "\n")


def _plots(out_dir: Path, src: dict, y: np.ndarray, data: dict, points: list[dict],
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
    conf1 = softmax_np(out["exits"][0]).max(-1)
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
