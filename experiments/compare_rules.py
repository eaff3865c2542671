"""Exit rules compared at their calibrated operating points, with paired bootstrap intervals
over test images (issue 11, item 8).

    python experiments/compare_rules.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg

For each target drop, every rule's threshold is chosen on the calibration split alone: the
largest FLOPs saving whose calibration accuracy is within the target of the last exit's,
over every distinct calibration score as a candidate threshold; or, with --alpha, the
cheapest threshold Learn-then-Test certifies (`api.calibrate(..., alpha=)`). Test images then give each
rule's accuracy and FLOPs saving, and the proposed expert is compared with every other rule
on the same bootstrap resamples of the test images (paired): the difference in FLOPs saving
and in accuracy, with 95% percentile intervals, and a verdict. By default each expert is the
workdir's one trained copy, so the intervals cover test-set sampling only; with
--expert-scores (and --aux5b-scores) the seeds of experiments/expert_seeds.py take its place and
every resample also draws a seed (one per rule, shared by its accuracy and saving), so the
intervals cover both. With --resample-calibration each resample also redraws the
calibration images and re-chooses every threshold on them, so the intervals cover the
calibration draw too (the variability a user who calibrates on their own images sees).

    python experiments/compare_rules.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg \
        --expert-scores runs/es15/part1_scores.npz --aux5b-scores runs/es15/part2_scores.npz \
        --aux5b-name Aux+5b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import api, checkpoints, data as data_lib  # noqa: E402
from cnneb_jax.guarantee import (bootstrap_means, candidate_thresholds,  # noqa: E402
                                  certified_threshold, choose_threshold_guaranteed,
                                  loss_gain_counts)
from cnneb_jax.controller import all_outputs, last_exit_flops, path_flops  # noqa: E402
from cnneb_jax.pipeline import materialize  # noqa: E402
from cnneb_jax.sweep import (EXPERT_RULES, branch_scores, choose_threshold, route,  # noqa: E402
                             sweep_rule)


def with_scores(outputs: dict, rule: str, scores: np.ndarray) -> dict:
    """`outputs` whose expert for `rule` at the first branch point says P(Other) = scores."""
    s = np.clip(np.asarray(scores, np.float64), 1e-12, 1 - 1e-12)
    key = {"expert": "experts", "aux5b": "aux5b"}[rule]
    out = {**outputs, key: [np.stack([np.zeros_like(s), np.log(s) - np.log1p(-s)], -1)]}
    assert np.allclose(branch_scores(out, rule)[0], s, atol=1e-6)
    return out


def per_image(outputs: dict, labels: np.ndarray, rule: str, threshold: float,
              costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct (0/1) and FLOPs of every image at this point."""
    exits = route(branch_scores(outputs, rule), threshold)
    preds = np.stack([o.argmax(-1) for o in outputs["exits"]])[exits, np.arange(len(labels))]
    return (preds == labels).astype(np.float64), costs[exits]


def interval(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(x, [2.5, 97.5])
    return float(lo), float(hi)


def quick_threshold(preds: np.ndarray, labels: np.ndarray, scores: list[np.ndarray],
                    drop: float, alpha: float | None) -> float:
    """The threshold `choose_threshold_guaranteed` (with alpha) or the naive rule (the
    cheapest candidate whose drop on these images meets the target) picks, from counts
    alone: fast enough to re-choose in every bootstrap resample."""
    if alpha:
        return certified_threshold(preds, labels, scores, drop, alpha)[0]
    # the naive rule may let every image leave
    thresholds = np.append(candidate_thresholds(scores), 0.0)
    losses, gains = loss_gain_counts(preds, labels, scores, thresholds)
    ok = np.nonzero((losses - gains) / len(labels) <= drop + 1e-12)[0]
    return float(thresholds[ok[-1]])  # t = 1 always passes: its drop is 0


def resampled_calibration(seeded: dict, y_cal: np.ndarray, y_test: np.ndarray,
                          ref_correct: np.ndarray, costs_of: dict, ref_flops: float,
                          drop: float, alpha: float | None, resamples: int,
                          seed: int) -> dict[str, np.ndarray]:
    """Bootstrap means that cover the whole procedure: each resample draws the calibration
    images and the test images (with replacement; the same draws for every rule, so rules
    stay paired), one seed per rule (its accuracy and saving come from that seed),
    re-chooses each rule's threshold on the resampled calibration images, and measures it
    on the resampled test images. `seeded[rule]` lists (calibration outputs, test outputs)
    per seed."""
    rng = np.random.default_rng(seed)
    prep = {}
    for rule, pairs in seeded.items():
        prep[rule] = []
        for cal_o, test_o in pairs:
            prep[rule].append((np.stack([o.argmax(-1) for o in cal_o["exits"]]),
                               branch_scores(cal_o, rule, y_cal), test_o))
    out = {"ref": np.empty(resamples)}
    for rule in seeded:
        out[f"{rule}:acc"], out[f"{rule}:saving"] = np.empty(resamples), np.empty(resamples)
    for b in range(resamples):
        ic = rng.integers(0, len(y_cal), len(y_cal))
        it = rng.integers(0, len(y_test), len(y_test))
        out["ref"][b] = ref_correct[it].mean()
        for rule, per_seed in prep.items():
            preds, scores, test_o = per_seed[rng.integers(len(per_seed))]
            t = quick_threshold(preds[:, ic], y_cal[ic], [s[ic] for s in scores], drop, alpha)
            ok, fl = per_image(test_o, y_test, rule, t, costs_of[rule])
            out[f"{rule}:acc"][b] = ok[it].mean()
            out[f"{rule}:saving"][b] = 1 - fl[it].mean() / ref_flops
    return out


def verdict(lo: float, hi: float, more: str, less: str) -> str:
    return more if lo > 0 else less if hi < 0 else "no difference the test set can show"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", required=True, help="the image folder the workdir was trained on")
    p.add_argument("--drops", default="0.005,0.01,0.02", help="target drops (fractions)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=None,
                   help="certify each threshold instead (Learn-then-Test, api.calibrate's "
                        "alpha): the expected drop exceeds the target with probability at most "
                        "alpha over the calibration draw")
    p.add_argument("--expert-scores", default=None,
                   help="scores of several expert seeds (experiments/expert_seeds.py --scores-out)")
    p.add_argument("--expert-name", default="E1 (paper)",
                   help="which expert of --expert-scores the 'expert' rule uses")
    p.add_argument("--aux5b-name", default=None,
                   help="which expert of --aux5b-scores the 'aux5b' rule uses (default: the "
                        "workdir's own)")
    p.add_argument("--aux5b-scores", default=None,
                   help="the seeds file --aux5b-name is read from (default: --expert-scores), "
                        "when the Aux+5b seeds were trained in another expert_seeds.py run")
    p.add_argument("--resample-calibration", action="store_true",
                   help="intervals that also resample the calibration images and re-choose "
                        "every threshold in each resample (one seed per rule per resample), "
                        "so they cover the calibration draw as well as the test set")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    drops = [float(d) for d in args.drops.split(",")]
    cfg = checkpoints.load_config(Path(args.workdir))
    d = data_lib.load_dataset(cfg, args.data_dir)
    c = api.load(args.workdir, warm=False)
    x_cal, y_cal = np.asarray(materialize(d["calib_images"])), np.asarray(d["calib_labels"])
    x_test, y_test = np.asarray(materialize(d["test_images"])), np.asarray(d["test_labels"])
    out_cal, out_test = all_outputs(c, x_cal), all_outputs(c, x_test)
    ref_flops = last_exit_flops(c)
    ref_cal = float((out_cal["exits"][-1].argmax(-1) == y_cal).mean())
    ref_correct = (out_test["exits"][-1].argmax(-1) == y_test).astype(np.float64)
    seeded = {}
    files = {"expert": args.expert_scores, "aux5b": args.aux5b_scores or args.expert_scores}
    for rule, name in (("expert", args.expert_name), ("aux5b", args.aux5b_name)):
        if name is None or files[rule] is None:
            continue
        npz = np.load(files[rule])
        if f"{name}|calib" not in npz:
            p.error(f"{files[rule]} has no expert {name!r}; it has "
                    f"{sorted({k.split('|')[0] for k in npz.files if '|' in k})}")
        cal, test = npz[f"{name}|calib"], npz[f"{name}|test"]
        if cal.shape[1] != len(y_cal) or test.shape[1] != len(y_test):
            p.error(f"{files[rule]} was made on other calibration/test images")
        seeded[rule] = [(with_scores(out_cal, rule, a), with_scores(out_test, rule, b))
                        for a, b in zip(cal, test)]
        print(f"rule {rule!r}: {len(cal)} seeds of {name}")
    print(f"{len(y_cal)} calibration images (O{c.model.num_exits} {ref_cal:.4f}), "
          f"{len(y_test)} test images (O{c.model.num_exits} {ref_correct.mean():.4f}); "
          f"{args.resamples} paired bootstrap resamples of the test images")
    result = {"workdir": args.workdir, "resamples": args.resamples, "alpha": args.alpha,
              "resample_calibration": args.resample_calibration, "targets": []}
    for drop in drops:
        values, points = {"ref": ref_correct}, {}
        for rule in EXPERT_RULES:
            costs = path_flops(c, rule)
            correct, flops, thresholds = [], [], []
            for cal_o, test_o in seeded.get(rule, [(out_cal, out_test)]):
                if args.alpha:
                    chosen = choose_threshold_guaranteed(cal_o, y_cal, rule, costs, drop,
                                                         args.alpha)
                else:
                    candidates = np.unique(np.concatenate(branch_scores(cal_o, rule)
                                                          + [[0.0, 1.0]]))
                    chosen = choose_threshold(sweep_rule(cal_o, y_cal, rule, costs, candidates),
                                              ref_cal, max_drop=drop)
                if chosen is None:
                    break
                ok, fl = per_image(test_o, y_test, rule, chosen["threshold"], costs)
                correct.append(ok)
                flops.append(fl)
                thresholds.append(chosen["threshold"])
            else:
                one = rule not in seeded
                values[f"{rule}:acc"] = correct[0] if one else np.stack(correct)
                values[f"{rule}:saving"] = 1 - (flops[0] if one else np.stack(flops)) / ref_flops
                points[rule] = float(np.mean(thresholds))
        if args.resample_calibration:
            boot = resampled_calibration(
                {r: seeded.get(r, [(out_cal, out_test)]) for r in points}, y_cal, y_test,
                ref_correct, {r: path_flops(c, r) for r in points}, ref_flops, drop,
                args.alpha, args.resamples, args.seed)
        else:
            # A rule's accuracy and saving come from one seed in each resample.
            boot = bootstrap_means(values, args.resamples, args.seed,
                                   groups={k: k.split(":")[0] for k in values})
        target = {"target_drop": drop, "rules": {}, "expert_vs": {}}
        how = f"certified, alpha {args.alpha}" if args.alpha else "largest saving within it"
        print(f"\ntarget drop {drop * 100:.1f} pt (thresholds chosen on calibration: {how})")
        print("| rule | threshold | test accuracy [95% CI] | drop vs O2, pt [95% CI] | "
              "FLOPs saving [95% CI] | drop within target in resamples |")
        print("|---|---:|---:|---:|---:|---:|")
        for rule, t in points.items():
            acc, sav = boot[f"{rule}:acc"], boot[f"{rule}:saving"]
            dropped = boot["ref"] - acc
            r = target["rules"][rule] = {
                "threshold": t, "accuracy": float(values[f"{rule}:acc"].mean()),
                "accuracy_ci": interval(acc),
                "drop": float(ref_correct.mean() - values[f"{rule}:acc"].mean()),
                "drop_ci": interval(dropped), "saving": float(values[f"{rule}:saving"].mean()),
                "saving_ci": interval(sav), "within_target": float((dropped <= drop).mean())}
            print(f"| {rule} | {t:.4f} | {r['accuracy']:.4f} [{r['accuracy_ci'][0]:.4f}, "
                  f"{r['accuracy_ci'][1]:.4f}] | {100 * r['drop']:.2f} [{100 * r['drop_ci'][0]:.2f}, "
                  f"{100 * r['drop_ci'][1]:.2f}] | {r['saving']:.1%} [{r['saving_ci'][0]:.1%}, "
                  f"{r['saving_ci'][1]:.1%}] | {r['within_target']:.1%} |")
        if "expert" in points:
            print("| expert minus | FLOPs saving, pt [95% CI] | accuracy, pt [95% CI] | verdict |")
            print("|---|---:|---:|---|")
            for rule in points:
                if rule == "expert":
                    continue
                ds = boot["expert:saving"] - boot[f"{rule}:saving"]
                da = boot["expert:acc"] - boot[f"{rule}:acc"]
                s_mean = float(values["expert:saving"].mean() - values[f"{rule}:saving"].mean())
                a_mean = float(values["expert:acc"].mean() - values[f"{rule}:acc"].mean())
                v = (verdict(*interval(ds), "the expert saves more", "the expert saves less")
                     + "; " + verdict(*interval(da), "the expert is more accurate",
                                      "the expert is less accurate"))
                target["expert_vs"][rule] = {"saving_diff": s_mean, "saving_diff_ci": interval(ds),
                                             "accuracy_diff": a_mean,
                                             "accuracy_diff_ci": interval(da), "verdict": v}
                print(f"| {rule} | {100 * s_mean:+.1f} [{100 * interval(ds)[0]:+.1f}, "
                      f"{100 * interval(ds)[1]:+.1f}] | {100 * a_mean:+.2f} "
                      f"[{100 * interval(da)[0]:+.2f}, {100 * interval(da)[1]:+.2f}] | {v} |")
        result["targets"].append(target)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
