"""Under- or over-fitting? Every exit's accuracy on training images against test images.

    python experiments/fit_gap.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg

Evaluates a trained workdir (or a release folder) in eval mode, without augmentation, on the
first `--train-images` of its training split and on the test split, and prints both per
exit with the gap. A backbone that is far from 100% on the images it trained on is limited
by how far training got (longer, larger, better optimised); one near 100% with a wide gap is
limited by generalisation (more data, more augmentation, regularisation).
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained workdir or release folder")
    p.add_argument("--data-dir", default=None,
                   help="image folder with train/ and test/ (default: tfds.load)")
    p.add_argument("--train-images", type=int, default=10000,
                   help="how many training images to evaluate (default 10000)")
    args = p.parse_args()

    from cnneb_jax import data as data_lib
    from cnneb_jax.pipeline import materialize
    from cnneb_jax.evaluation import exit_accuracies, predict_all
    from cnneb_jax.workdir import load_trained

    model, variables = load_trained(args.workdir)
    cfg = model.cfg
    data = data_lib.load_dataset(cfg, args.data_dir)
    n = min(args.train_images, len(data["train_labels"]))
    # Slice before decoding: a streamed split decodes only the images evaluated.
    splits = {"train": (materialize(data["train_images"][:n]), data["train_labels"][:n]),
              "test": (materialize(data["test_images"]), data["test_labels"])}
    acc = {}
    for name, (x, y) in splits.items():
        out = predict_all(model, variables, x, cfg.eval_batch_size, name)
        acc[name] = exit_accuracies(out, y)
    print(f"exit   train ({n} images)   test ({len(splits['test'][1])})   gap")
    for exit_name, a in acc["train"].items():
        b = acc["test"][exit_name]
        print(f"{exit_name}     {a:.4f}               {b:.4f}          {100 * (a - b):.2f} pt")


if __name__ == "__main__":
    main()
