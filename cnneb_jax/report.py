"""`evaluate.py --sweep`: measure every rule over a threshold grid and write Table 2,
the paper's figures, and every point as CSV/JSON.

Accuracy, exit shares and FLOPs of every grid point come from the outputs of every exit
(exact, see sweep.py). Time is measured by running the real cascade: batch mode (images/s,
median of repeats after warm-up) on a timing subset, and single-image latency on a few images.
Operating points are chosen on the calibration split (held out from training, never seen
by the experts) and then measured on test.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cnneb_jax import sweep_files
from cnneb_jax.controller import (all_outputs, first_exit_flops, last_exit_flops, path_flops,
                                  run_cascade, run_plain, step_flops)
from cnneb_jax.diagnostics import exit_gap, exit_gap_warning
from cnneb_jax.guarantee import choose_threshold_guaranteed, within_target_share
from cnneb_jax.programs import Cascade, warm_up
from cnneb_jax.sweep import (EXPERT_RULES, branch_scores, choose_threshold, evaluate_point,
                             sweep_rule, threshold_grid)
from cnneb_jax.timing import paired_batch, paired_single, stratified, time_batch, time_single


DROPS = (0.005, 0.01, 0.02)


def executed_flops(c: Cascade, rows_run: np.ndarray, n: int, rule: str) -> float:
    """FLOPs per image of `n` that the controller really ran, bucket padding included:
    program i ran segment and exit i (and the rule at a branch point) on `rows_run[i]`
    rows (what `run_cascade` returns)."""
    segs, heads, rule_cost = step_flops(c, rule)
    per_row = [segs[i] + heads[i] + rule_cost[i] for i in range(len(segs))]
    return float(np.dot(rows_run, per_row)) / n


@dataclasses.dataclass
class _Run:
    """What every step of a sweep reads: the splits, every exit's outputs on them, the
    rules to route (rule -> the cascade that routes it, its rule there, test outputs,
    calibration outputs; an ablation's expert is "expert:<name>") and their path costs."""
    c: Cascade
    x_test: np.ndarray
    y_test: np.ndarray
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_time: np.ndarray
    x_single: np.ndarray
    out_test: dict
    out_cal: dict
    src: dict
    costs_of: dict
    repeats: int

    @property
    def m(self) -> int:
        return self.c.model.num_exits

    @property
    def out_time(self) -> dict:
        return _head_rows(self.out_test, len(self.x_time))

    def scores(self, rule: str, outputs: dict | None = None) -> np.ndarray:
        _, base_rule, o_test, _ = self.src[rule]
        return branch_scores(o_test if outputs is None else outputs, base_rule)


def sweep(c: Cascade, data: dict, out_dir: Path, repeats: int = 3, timing_images: int = 2000,
          single_images: int = 50, timed_points: int = 9, alpha: float | None = 0.1,
          resamples: int = 1000, ablations: dict[str, Cascade] | None = None) -> dict:
    """Every rule over its grid, then Table 2. With `alpha` each operating point is the
    cheapest threshold Learn-then-Test certifies on the calibration split (its expected drop
    on new images exceeds the target with probability at most alpha over the calibration
    draw, `guarantee.py`); with alpha None or 0,
    the cheapest point of a 41-quantile grid whose calibration drop meets the target (no
    margin). Each row reports the share of `resamples` bootstrap resamples of the test
    images on which the realized drop stays within the target at that fixed threshold
    (test-set noise; `guarantee.exceedance_rates` measures the guarantee itself).

    `ablations` maps a name to a cascade with the same backbone and other experts (trained
    with `train.py --backbone-from`); its expert becomes the rule "expert:<name>", swept,
    calibrated and timed beside the others."""
    if alpha is not None and not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (0: no guarantee), got {alpha}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The reference (the last exit alone) is timed against the cascade: compile its
    # programs up front as the cascade's are, so neither pays a compile in a timed round.
    warm_up(c, reference=True)
    run = _outputs(c, data, timing_images, single_images, repeats, ablations)
    acc = [float((o.argmax(-1) == run.y_test).mean()) for o in run.out_test["exits"]]
    base = _baselines(run, acc)
    points = _grid_points(run, base[f"O{run.m} only"], timed_points)
    how = f"certified at alpha {alpha}" if alpha else "fitted, no margin"
    print(f"[sweep] operating points chosen on the calibration split ({how}), measured on test")
    table = _table2(run, base, [p for p in points if p["rule"] == "oracle"], alpha, resamples)
    result = {"exits_accuracy": acc, "baselines": base, "table2": table, "points": points,
              "flops": c.flops, "repeats": repeats, "timing_images": len(run.x_time),
              "single_images": len(run.x_single), "alpha": alpha or None,
              "resamples": resamples}
    # Beside Table 2: does the deep exit earn its cost on held-out images at all?
    gap = exit_gap(run.out_cal["exits"], run.y_cal)
    result["calibration_exit_gap"] = gap
    warning = exit_gap_warning(gap)
    if warning:
        result["warning"] = warning
        print(f"warning: {warning}", file=sys.stderr)
    sweep_files.write_points(out_dir, points)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    sweep_files.write_tensorboard(out_dir / "tensorboard", points)
    sweep_files.write_table2(out_dir / "table2.md", base, table, run.m, alpha or None, warning)
    sweep_files.plots(out_dir, run.src, run.y_test, data, points, base, run.m)
    return result


def _outputs(c: Cascade, data: dict, timing_images: int, single_images: int, repeats: int,
             ablations: dict[str, Cascade] | None) -> _Run:
    """Every exit's and expert's outputs on the test and calibration splits (and each
    ablation's, refused unless it shares the backbone)."""
    x_test, y_test = data["test_images"], data["test_labels"]
    x_cal, y_cal = data["calib_images"], data["calib_labels"]
    print(f"[sweep] outputs of every exit: test {len(x_test)}, calibration {len(x_cal)}")
    out_test, out_cal = all_outputs(c, x_test), all_outputs(c, x_cal)
    src = {r: (c, r, out_test, out_cal) for r in EXPERT_RULES}
    for name, ca in (ablations or {}).items():
        print(f"[sweep] outputs of the ablation {name!r}")
        src[f"expert:{name}"] = (ca, "expert", all_outputs(ca, x_test), all_outputs(ca, x_cal))
        same_backbone(out_test, src[f"expert:{name}"][2], name)
    costs_of = {r: path_flops(cc, base_rule) for r, (cc, base_rule, _, _) in src.items()}
    costs_of["oracle"] = path_flops(c, "oracle")
    return _Run(c, x_test, y_test, x_cal, y_cal, x_test[:timing_images],
                x_test[:single_images], out_test, out_cal, src, costs_of, repeats)


def _baselines(run: _Run, acc: list[float]) -> dict:
    """The plain networks, O1 alone and the last exit alone: accuracy, FLOPs, time."""
    c, m = run.c, run.m
    print("[sweep] timing the plain networks (O1 only, last exit only)")
    base = {}
    for name, idx, flops in (("O1 only", 0, first_exit_flops(c)),
                             (f"O{m} only", m - 1, last_exit_flops(c))):
        plain = lambda x, i=idx: run_plain(c, x, i)
        base[name] = {"accuracy": acc[idx], "flops": flops,
                      "ms_batch": time_batch(c, run.x_time, plain, run.repeats),
                      **time_single(run.x_single, plain)}
    return base


def _grid_points(run: _Run, ref: dict, timed_points: int) -> list[dict]:
    """Every rule over its threshold grid on test (exact, from the outputs), with wall-clock
    on a few points of each grid (the oracle is a bound: FLOPs only)."""
    points: list[dict] = []
    swept = {**run.src, "oracle": (run.c, "oracle", run.out_test, run.out_cal)}
    for rule, (_, base_rule, o_test, _) in swept.items():
        grid = threshold_grid(branch_scores(o_test, base_rule, run.y_test))
        if rule == "oracle":
            # FT samples are a few percent: quantiles alone would step over them in one go.
            grid = np.unique(np.concatenate([grid, np.linspace(0, 0.5, 201)]))
        points += [{**p, "rule": rule} for p in sweep_rule(o_test, run.y_test, base_rule,
                                                            run.costs_of[rule], grid)]
    timed = [p for rule in run.src for p in _spread([q for q in points if q["rule"] == rule],
                                                       timed_points)]
    y_time, out_time = run.y_test[:len(run.x_time)], run.out_time
    scores_time = {r: run.scores(r, _head_rows(o, len(run.x_time)))
                   for r, (_, _, o, _) in run.src.items()}
    for p in tqdm(timed, desc="timing sweep points"):
        cc, base_rule = run.src[p["rule"]][:2]
        route = lambda x, p=p, cc=cc, r=base_rule: run_cascade(cc, x, r, p["threshold"])
        p["ms_batch"] = time_batch(run.c, run.x_time, route, run.repeats)
        p["flops_timing_subset"] = evaluate_point(out_time, y_time, scores_time[p["rule"]],
                                                  p["threshold"], run.costs_of[p["rule"]])["flops"]
    for p in points:
        p["flops_saving"] = 1.0 - p["flops"] / ref["flops"]
        if "ms_batch" in p:
            p["time_saving"] = 1.0 - p["ms_batch"] / ref["ms_batch"]
            # > 1 means routing, gathering and padding cost more than the FLOPs say.
            p["time_over_flops"] = ((p["ms_batch"] / ref["ms_batch"])
                                    / (p["flops_timing_subset"] / ref["flops"]))
    return points


def _table2(run: _Run, base: dict, oracle_pts: list[dict], alpha: float | None,
            resamples: int) -> list[dict]:
    """Table 2's rows: for each target drop and rule, the threshold chosen on the
    calibration split, then the real cascade measured on test."""
    y_cal = run.y_cal
    cal_ref = float((run.out_cal["exits"][-1].argmax(-1) == y_cal).mean())
    # The no-margin fit's grid on calibration; certified points search every score instead.
    cal_pts_of = {} if alpha else {r: sweep_rule(o_cal, y_cal, base_rule, run.costs_of[r])
                                   for r, (_, base_rule, _, o_cal) in run.src.items()}
    table = []
    for drop in DROPS:
        for rule, (_, base_rule, _, o_cal) in run.src.items():
            if alpha:
                chosen = choose_threshold_guaranteed(o_cal, y_cal, base_rule,
                                                     run.costs_of[rule], drop, alpha)
            else:
                chosen = choose_threshold(cal_pts_of[rule], cal_ref, max_drop=drop)
            if chosen is not None:
                table.append(_operating_point(run, base, oracle_pts, rule, drop, chosen,
                                              alpha, resamples))
    return table


def _operating_point(run: _Run, base: dict, oracle_pts: list[dict], rule: str, drop: float,
                     chosen: dict, alpha: float | None, resamples: int) -> dict:
    """One row of Table 2: the real cascade at the chosen threshold on the whole test split
    (accuracy, FLOPs, exit shares, within-target share), then its time against the last
    exit alone, paired, in batch mode and one image at a time."""
    c, m, y_test, ref = run.c, run.m, run.y_test, base[f"O{run.m} only"]
    cc, base_rule = run.src[rule][:2]
    t, costs = chosen["threshold"], run.costs_of[rule]
    real = run_cascade(cc, run.x_test, base_rule, t)
    test_acc = float((real["logits"].argmax(-1) == y_test).mean())
    last_right = run.out_test["exits"][-1].argmax(-1) == y_test
    row = {"rule": rule, "target_drop": drop, "threshold": t, "accuracy": test_acc,
           "flops": float(real["flops"].mean()),
           "executed_flops": executed_flops(cc, real["rows_run"], len(run.x_test), base_rule),
           "share_exit1": float((real["exit"] == 0).mean()),
           "alpha": alpha or None, "drop_ucb": chosen.get("drop_ucb"),
           "within_target": within_target_share(
               last_right, real["logits"].argmax(-1) == y_test, drop, resamples)}
    route = lambda x: run_cascade(cc, x, base_rule, t)
    row.update(_paired_times(run, route, real["exit"][:len(run.x_time)], rule, t, ref))
    idx = stratified(real["exit"], len(run.x_single))
    row.update(paired_single(run.x_test[idx], lambda x: run_plain(c, x, m - 1), route))
    row["ms_single"] = row["ms_single_mean"]
    row["flops_saving"] = 1 - row["flops"] / ref["flops"]
    row["executed_flops_saving"] = 1 - row["executed_flops"] / ref["flops"]
    # Consistency: the real cascade's accuracy equals the one the exit outputs give.
    row["accuracy_from_outputs"] = evaluate_point(run.out_test, y_test, run.scores(rule), t,
                                                  costs)["accuracy"]
    o = choose_threshold(oracle_pts, test_acc, flops_budget=None, max_drop=0.0)
    row["oracle_flops_saving_same_acc"] = (1 - o["flops"] / ref["flops"]) if o else None
    return row


def _paired_times(run: _Run, route, exits_sub: np.ndarray, rule: str, t: float,
                  ref: dict) -> dict:
    """Batch mode, paired: the last exit alone, the point and (with two exits) the point's
    two pure paths (every sample leaves at O1 / none does, same rule) in interleaved rounds,
    on the timing subset."""
    c, m = run.c, run.m
    cc, base_rule = run.src[rule][:2]
    runs = {"ref": lambda x: run_plain(c, x, m - 1), "point": route}
    if m == 2:
        runs.update(all_leave=lambda x: run_cascade(cc, x, base_rule, -1.0),
                    none_leave=lambda x: run_cascade(cc, x, base_rule, 2.0))
    sec = paired_batch(run.x_time, runs, run.repeats)
    ratio = sec["point"] / sec["ref"]
    out = {"ms_batch": 1e3 * float(np.median(sec["point"])),
           "ref_ms_batch": 1e3 * float(np.median(sec["ref"])),
           "time_saving": float(1 - np.median(ratio)),
           "time_saving_min": float(1 - ratio.max()),
           "time_saving_max": float(1 - ratio.min())}
    # Batch-mode time is measured on the timing subset: compare with its FLOPs.
    f_sub = evaluate_point(run.out_time, run.y_test[:len(run.x_time)],
                           run.scores(rule, _head_rows(run.src[rule][2], len(run.x_time))),
                           t, run.costs_of[rule])["flops"]
    out["time_over_flops"] = float(np.median(ratio)) / (f_sub / ref["flops"])
    if m == 2:
        # Routing overhead: measured time against the time its two paths predict for this
        # mix of exits (segments run at different GFLOP/s on a CPU, so a FLOPs line cannot
        # separate overhead from hardware efficiency).
        s1 = float((exits_sub == 0).mean())
        pred = s1 * sec["all_leave"] + (1 - s1) * sec["none_leave"]
        out["routing_overhead"] = float(np.median(sec["point"] / pred) - 1)
        # Fixed overhead: the cascade where nothing leaves early (O1's head, the rule and
        # the host read run for nothing) against the last exit alone, same rounds.
        out["fixed_overhead"] = float(np.median(sec["none_leave"] / sec["ref"]) - 1)
    return out


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


