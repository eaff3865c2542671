"""How often a calibrated threshold misses its accuracy-drop target on test: the naive choice
(meets the drop on the calibration images, `sweep.choose_threshold`) against the certified
one (Learn-then-Test, `cnneb_jax.guarantee`), over bootstrap resamples of the calibration
split, with the FLOPs each spends.

    python experiments/calibration_guarantee.py --workdir pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg --alpha 0.1 --resamples 200

Each resample stands for a fresh calibration draw; the test split stands for the population.
A certified rule should exceed its target in at most about alpha of the resamples.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--drops", default="0.005,0.01,0.02")
    p.add_argument("--rules", default="expert,max_softmax,entropy")
    p.add_argument("--out", default=None, help="write every rate as JSON here")
    args = p.parse_args()

    from cnneb_jax import api
    from cnneb_jax import data as data_lib
    from cnneb_jax.checkpoints import load_config
    from cnneb_jax.controller import all_outputs, path_flops, last_exit_flops
    from cnneb_jax.guarantee import exceedance_rates

    cascade = api.load(args.workdir, warm=False)
    cfg = load_config(Path(args.workdir)) if (Path(args.workdir) / "config.json").exists() \
        else cascade.model.cfg
    data = data_lib.load_dataset(cfg, args.data_dir)
    cal = (all_outputs(cascade, data["calib_images"]), data["calib_labels"])
    test = (all_outputs(cascade, data["test_images"]), data["test_labels"])
    full = last_exit_flops(cascade)
    print(f"{args.workdir}: {len(cal[1])} calibration and {len(test[1])} test images, "
          f"alpha {args.alpha}, {args.resamples} resamples")
    print("| rule | target drop | naive: share over target | naive: FLOPs saved | "
          "certified: share over target | certified: FLOPs saved |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for rule in args.rules.split(","):
        for drop in (float(d) for d in args.drops.split(",")):
            r = exceedance_rates(cal, test, rule, path_flops(cascade, rule), drop, args.alpha,
                                 args.resamples)
            n, g = r["naive"], r["guaranteed"]
            print(f"| {rule} | {drop:.3f} | {n['exceed_rate']:.3f} | "
                  f"{1 - n['mean_flops'] / full:.1%} | {g['exceed_rate']:.3f} | "
                  f"{1 - g['mean_flops'] / full:.1%} |")
            rows.append({"rule": rule, "target_drop": drop,
                         **{f"{k}_{q}": v for k, d in r.items() for q, v in d.items()},
                         "naive_flops_saving": 1 - n["mean_flops"] / full,
                         "guaranteed_flops_saving": 1 - g["mean_flops"] / full})
    if args.out:
        import json
        Path(args.out).write_text(json.dumps(
            {"workdir": args.workdir, "alpha": args.alpha, "resamples": args.resamples,
             "calibration_images": len(cal[1]), "test_images": len(test[1]), "rows": rows},
            indent=1))


if __name__ == "__main__":
    main()
