"""Early-exit targets as ratios from one sweep run (`evaluate.py --sweep` writes sweep.json).

    python bench/early_exit.py runs/cifar/sweep/sweep.json

Prints, for the operating points chosen on the calibration split and measured on test:
batch-mode time saving against the last exit alone, single-image saving, FLOPs saving,
each rule's saving against the proposed expert's and the oracle's, and the worst ratio of
measured time to FLOPs-predicted time over every timed sweep point.

Every threshold here was chosen on the calibration split. Rules are compared at equal
accuracy, with paired bootstrap intervals, by experiments/compare_rules.py; this script no longer
reads "the best point of each curve" off the test split (issue 11, item 8).
"""

from __future__ import annotations

import json

import benchlib


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("sweep_json")
    args = p.parse_args(argv)
    r = json.load(open(args.sweep_json))
    m = len(r["exits_accuracy"])
    ref = r["baselines"][f"O{m} only"]
    print(f"O{m} only: accuracy {ref['accuracy']:.4f}, {ref['ms_batch']:.3f} ms/img batch, "
          f"{ref['ms_single']:.2f} ms single")
    print(f"{'rule':12s} {'target':>6s} {'acc drop':>8s} {'time sav':>8s} {'single sav':>10s} "
          f"{'FLOPs sav':>9s} {'oracle FLOPs sav':>16s} {'time/FLOPs':>10s}")
    for row in r["table2"]:
        drop = (ref["accuracy"] - row["accuracy"]) * 100
        oracle = row["oracle_flops_saving_same_acc"]
        print(f"{row['rule']:12s} {row['target_drop'] * 100:5.1f}pt {drop:7.2f}pt "
              f"{row['time_saving']:8.1%} {row['single_saving']:10.1%} {row['flops_saving']:9.1%} "
              f"{'-' if oracle is None else f'{oracle:.1%}':>16s} {row['time_over_flops']:10.3f}")
    for target in sorted({row["target_drop"] for row in r["table2"]}):
        rows = {row["rule"]: row for row in r["table2"] if row["target_drop"] == target}
        if "expert" in rows:
            e = rows["expert"]["time_saving"]
            others = ", ".join(f"{k} {v['time_saving']:.1%}" for k, v in rows.items() if k != "expert")
            print(f"target {target * 100:.1f} pt: expert saves {e:.1%} of the time; {others}")
    timed = [q for q in r["points"] if "time_over_flops" in q]
    worst = max(timed, key=lambda q: q["time_over_flops"])
    print(f"measured/FLOPs-predicted time over {len(timed)} timed points: median "
          f"{sorted(q['time_over_flops'] for q in timed)[len(timed) // 2]:.3f}, worst "
          f"{worst['time_over_flops']:.3f} ({worst['rule']} at threshold {worst['threshold']:.3f}); "
          f"target <= 1.10")


if __name__ == "__main__":
    main()
