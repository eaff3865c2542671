r"""Evaluate a trained CNN-EB workdir.

    python evaluate.py --sweep --workdir runs/cifar --out runs/cifar/sweep \
        --data-dir ../shared/datasets/cifar10-jpeg

--sweep runs every exit rule (proposed expert, Auxiliary+5b expert, O1 max softmax, O1
entropy, oracle) over a threshold grid and writes table2.md, pr.png, roc.png,
acc_vs_time.png, gallery.png, sweep.csv and sweep.json into --out. Operating points for
accuracy drops of 0.5, 1 and 2 points are chosen on the calibration split and measured on test:
by default each is the cheapest threshold that Learn-then-Test certifies at --alpha 0.1 (the
calibration draw yields a threshold whose expected drop on new images exceeds the target with
probability at most 0.1); --alpha 0 fits the target on the calibration images with no margin
instead. Table 2 gives, for each point, the share of bootstrap resamples of the test images on
which the realized drop stays within the target at that fixed threshold: test-set noise, not
the guarantee.
Without --sweep it prints the test accuracy of every exit and the backbone's self-report on
its held-out images (worst classes, most confused pairs, the last exit against O1).

    python evaluate.py --predict DIR --workdir runs/cifar --out preds.csv

--predict runs the calibrated cascade over every image file under DIR (class folders or
not; resized as the config says) and writes one CSV row per file: path, label, class_name,
exit, probability, flops, error (an unreadable file gets its error, not a crash). It routes
with the operating point stored by api.calibrate, or --rule and --threshold, or a point
calibrated now on the calibration split (--max-drop with --data-dir; not stored).
"""

from __future__ import annotations

import argparse
import sys

from cnneb_jax import host_memory
from cnneb_jax.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir with both stages finished")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/sweep)")
    p.add_argument("--sweep", action="store_true", help="run the threshold sweep and write reports")
    common.add_data_flags(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="largest batch the controller runs at once, O2 alone included "
                        "(default 128 on a CPU, where every path runs faster per image at "
                        "128 than at 256, docs/experiments.md §4; 256 on a GPU, where 128 runs "
                        "18-24%% slower per image, §7)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats per point; the median is reported (default 3)")
    p.add_argument("--timing-images", type=int, default=2000,
                   help="test images used for batch-mode timing (default 2000)")
    p.add_argument("--single-images", type=int, default=50,
                   help="test images timed one at a time for latency (default 50)")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="operating points certified at this level: the calibration draw yields "
                        "a threshold whose expected drop on new images exceeds the target "
                        "with probability at most alpha (default 0.1; "
                        "0 = fit the target on the calibration images, no margin)")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples of the test images for the within-target share "
                        "(default 1000)")
    p.add_argument("--ablation", action="append", default=[], metavar="DIR",
                   help="with --sweep: also sweep, calibrate and time the expert of DIR, a "
                        "workdir trained with `train.py --stage expert --backbone-from "
                        "WORKDIR` (same backbone, other experts: e.g. --config "
                        "cifar_confidence), as rows 'expert:<its expert_inputs>' (repeatable)")
    p.add_argument("--predict", default=None, metavar="DIR",
                   help="predict every image file under DIR and write a CSV to --out "
                        "(default predictions.csv)")
    p.add_argument("--rule", default=None,
                   help="with --predict: the exit rule (expert, aux5b, max_softmax, entropy); "
                        "default: the stored operating point's")
    p.add_argument("--threshold", type=float, default=None,
                   help="with --predict and --rule: the rule's threshold in [0, 1]")
    p.add_argument("--max-drop", type=float, default=None,
                   help="with --predict and --data-dir: calibrate the rule (default expert) "
                        "on the calibration split first, at most this drop from the last "
                        "exit (a fraction: 0.01 = one point; certified at --alpha); the point "
                        "is used, not stored")
    p.add_argument("--compute-dtype", default=None,
                   choices=["float32", "bfloat16", "bfloat16_deep", "bfloat16_checked"],
                   help="run the model in this precision instead of the workdir's own "
                        "(configs.py): bfloat16_checked runs bfloat16 and reruns its close "
                        "calls in float32 (margins chosen on the held-out split and stored "
                        "on first use, cnneb_jax/recheck.py), faster on CPUs with bfloat16 "
                        "while keeping the shipped model's labels (docs/RESULTS.md §8); "
                        "bfloat16_deep keeps segment 0 in float32 and runs the rest in "
                        "bfloat16")
    p.add_argument("--max-test", type=int, default=0,
                   help="use only the first N test images (0 = all; for quick checks)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # first: before NumPy or JAX start threads
    args = parse_args(argv)
    from pathlib import Path

    from cnneb_jax import api, distributed
    from cnneb_jax.checkpoints import CheckpointError, load_config
    from cnneb_jax.report import sweep
    from cnneb_jax.workdir import TrainingError

    distributed.initialize()  # multi-host when a launcher set it up; else nothing

    try:
        check_args(args)
        if args.predict is not None:
            return predict_folder(args)
        data = common.workdir_data(args, "calibrating and evaluating", args.max_test)
        if (args.compute_dtype == "bfloat16_checked"
                and not api.recheck_path(args.workdir).exists()):
            choose_recheck(args, data)
        # The sweep times the cascade, so it compiles every bucket size first; plain
        # accuracies only compile what they run.
        print(f"[evaluate] loading {args.workdir}"
              + (" and compiling every bucket size" if args.sweep else ""))
        cascade = api.load(args.workdir, max_batch=args.batch_size, warm=args.sweep,
                          compute_dtype=args.compute_dtype)
        ablations = {}
        for d in args.ablation:
            name = load_config(Path(d)).expert_inputs
            if name == cascade.model.cfg.expert_inputs or name in ablations:
                name = Path(d).name
            print(f"[evaluate] loading the ablation {d} as rule 'expert:{name}'")
            ablations[name] = api.load(d, max_batch=args.batch_size, warm=True,
                                       compute_dtype=args.compute_dtype)
        if not args.sweep:
            self_report(cascade, data)
            return 0
        out_dir = Path(args.out) if args.out else Path(args.workdir) / "sweep"
        result = sweep(cascade, data, out_dir, repeats=args.repeats,
                       timing_images=args.timing_images, single_images=args.single_images,
                       alpha=args.alpha, resamples=args.resamples, ablations=ablations)
        print((out_dir / "table2.md").read_text())
        print(f"[evaluate] wrote {out_dir}/{{table2.md,pr.png,roc.png,acc_vs_time.png,"
              f"gallery.png,sweep.csv,sweep.json}} ({len(result['points'])} points)")
    except (ValueError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Refuses flags that do not go together; picks the default --batch-size."""
    if args.batch_size is None:
        import jax
        args.batch_size = 128 if jax.default_backend() == "cpu" else 256
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if not 0.0 <= args.alpha < 1.0:
        raise ValueError(f"--alpha must be in [0, 1) (0: no guarantee), got {args.alpha}")
    if args.resamples < 1:
        raise ValueError("--resamples must be at least 1")
    if args.ablation and not args.sweep:
        raise ValueError("--ablation goes with --sweep")
    if args.predict is not None and args.sweep:
        raise ValueError("--predict and --sweep are separate runs")
    if args.predict is None and (args.rule is not None or args.threshold is not None
                                 or args.max_drop is not None):
        raise ValueError("--rule, --threshold and --max-drop go with --predict")


def choose_recheck(args: argparse.Namespace, data: dict) -> None:
    """Chooses and stores bfloat16_checked's margins on the held-out split (recheck.py)."""
    from cnneb_jax import api
    from cnneb_jax.backbone_stage import heldout_split
    from cnneb_jax.pipeline import materialize
    images = materialize(heldout_split(data)[0])
    print(f"[evaluate] choosing bfloat16_checked's margins on {len(images)} held-out images")
    point = api.choose_recheck(args.workdir, images, max_batch=args.batch_size)
    for i, (m, r) in enumerate(zip(point["margins"], point["heldout_rerun"])):
        print(f"[evaluate] O{i + 1}: rerun in float32 below top-2 margin {m:.4f} "
              f"({r:.2%} of the held-out images)")
    print(f"[evaluate] stored in {api.recheck_path(args.workdir)}")


def self_report(cascade, data: dict) -> None:
    """evaluate.py without --sweep: every exit's test accuracy, then the backbone's
    self-report on its held-out images (as its stage printed it)."""
    from cnneb_jax.backbone_stage import heldout_report, heldout_split
    from cnneb_jax.controller import all_outputs
    out = all_outputs(cascade, data["test_images"])
    for i, o in enumerate(out["exits"]):
        print(f"O{i + 1} test accuracy: {(o.argmax(-1) == data['test_labels']).mean():.4f}")
    # through the cascade, so that a checked precision's reruns count here too
    images, labels = heldout_split(data)
    heldout_report(cascade.model, cascade.variables, images, labels, data["class_names"],
                   cascade.model.cfg.eval_batch_size, outputs=all_outputs(cascade, images))


def predict_folder(args: argparse.Namespace) -> int:
    """evaluate.py --predict: the cascade over every image under args.predict, as a CSV."""
    import time
    from pathlib import Path

    from cnneb_jax import api, predictions
    from cnneb_jax import data as data_lib

    files = data_lib.list_images(args.predict)
    out = Path(args.out or "predictions.csv")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; with --predict it names the CSV file")
    if args.max_drop is not None and args.data_dir is None:
        raise ValueError("--max-drop calibrates on the calibration split: give --data-dir")
    print(f"[evaluate] loading {args.workdir}")
    cascade = api.load(args.workdir, max_batch=args.batch_size, warm=False,
                       compute_dtype=args.compute_dtype)
    rule, threshold = args.rule, args.threshold
    if args.max_drop is not None:
        data = common.workdir_data(args, "calibrating")
        point = api.calibrate(cascade, data["calib_images"],
                              data["calib_labels"], rule=rule or "expert",
                              max_drop=args.max_drop, alpha=args.alpha or None, save=False)
        rule, threshold = point["rule"], point["threshold"]
        print(f"[evaluate] calibrated {rule} at threshold {threshold:.4f} on "
              f"{len(data['calib_labels'])} calibration images")
    t0 = time.perf_counter()
    rows = api.predict_files(cascade, files, rule, threshold, progress=True)
    seconds = time.perf_counter() - t0
    predictions.write_csv(rows, out)
    summary = predictions.summarize(rows, seconds, cascade.model.num_exits,
                                    api.last_exit_flops(cascade), cascade.class_names)
    print(predictions.format_summary(summary))
    print(f"[evaluate] wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
