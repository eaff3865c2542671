"""Configs are data: one default (`cifar`) and variants that override a few fields."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# Inception v3 blocks in order, named as in the paper / TF-slim.
BLOCKS: tuple[str, ...] = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_3a_3x3",
    "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_5a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d",
    "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
)
# The blocks that keep their input's grid (config `skip_blocks` may leave them out).
SKIPPABLE: tuple[str, ...] = ("Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                              "Mixed_6e", "Mixed_7b", "Mixed_7c")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "cifar"
    # --- model ---
    num_classes: int = 0           # 0 = from the data (class folders or the tfds builder)
    image_size: int = 32
    width: float = 0.25            # multiplier on every Inception v3 channel count
    # Multipliers of their own for the blocks at the 8x8 grid (Mixed_6a-6e) and the 4x4 grid
    # (Mixed_7a-7c) on CIFAR; 0 = `width`. The small grids cost few FLOPs per channel.
    width_6: float = 0.0
    width_7: float = 0.0
    # Padding of the stride-2 / "valid" convs and pools. Original Inception v3: VALID.
    # CIFAR: SAME, so 32x32 inputs keep even sizes (16 -> 8 -> 4).
    padding: str = "SAME"
    stem_stride: int = 1           # stride of Conv2d_1a_3x3 (2 in the original)
    stem_channels: int = 0         # Conv2d_1a_3x3's output channels; 0 = 32 scaled by width
    # Conv2d_1a_3x3 frozen at a whitening of the training images' 3x3 patches (top
    # eigenvectors of their covariance, both signs), as airbench's first layer.
    whiten_stem: bool = False
    # Backbone convs start with their first min(in, out) output channels at the identity
    # (airbench's Dirac init): each plain conv begins as an implicit residual. On `cifar`,
    # +1.9 points of test O2 in the same 48 min (experiments.md §1, session 12).
    identity_init: bool = True
    use_pool_5a: bool = False      # MaxPool_5a_3x3 (stride 2) before Mixed_5b
    branch_points: tuple[str, ...] = ("Mixed_5b",)
    # Inception blocks left out (Mixed_5c/5d, Mixed_6b-6e, Mixed_7b/7c: each keeps its
    # input's grid, so the next block takes its input instead): a shallower network with
    # every block kind, e.g. for quick experiments.
    skip_blocks: tuple[str, ...] = ()
    # O1 avg-pool (original aux head: 5x5, stride 3). On a 16x16 CIFAR grid 3x3/2 keeps a
    # 7x7 map for the head's 5x5 conv instead of a 4x4 one.
    aux_pool: int = 3
    aux_pool_stride: int = 2
    aux_channels: int = 128        # O1 1x1 conv (scaled by width)
    aux_hidden: int = 768          # O1 kxk conv (scaled by width)
    expert_hidden: int = 64        # E1 dense layer after the concat; 0 = a single dense
    # What E1 concatenates to its O1-like features: "paper" (O1's softmax output), "logits"
    # (O1's pre-softmax output x̂_O1, as the paper's Eq. (5) writes it) or "paper+confidence"
    # (also O1's logits, max probability, margin, entropy: an ablation that hands E1 the
    # max-softmax score; config "cifar_confidence").
    expert_inputs: str = "paper"
    dropout: float = 0.0
    bn_momentum: float = 0.9
    # Mixed precision: "bfloat16" computes convs/matmuls in bf16 with float32 parameters,
    # optimizer state and BatchNorm statistics (meant for GPUs). "bfloat16_deep": segment 0
    # (the image up to the first branch point) in float32, everything after it (the deep
    # segments, the exits, the experts) in bfloat16. For inference on CPUs with bfloat16:
    # on the shipped `cifar` model it keeps float32's labels on 99.8% of the test images,
    # where bfloat16 everywhere does not, and on `full` it runs 1.5x float32's speed
    # (docs/RESULTS.md §8).
    # "float64" keeps everything in float64 (needs JAX_ENABLE_X64=1): exact comparisons in tests.
    compute_dtype: str = "float32"
    # oneDNN's convolution and pooling kernels on the CPU (cnneb_jax/onednn.py, built by
    # setup.sh; docs/experiments.md §15): "on", "off" (XLA's), "auto" = on where they are built
    # and the backend is the CPU, "inference" = auto for inference, XLA's for training.
    onednn: str = "auto"
    # Inference buckets of fewer images run XLA's kernels even where oneDNN's are on: per
    # call oneDNN's cost more there (2x slower at one image, docs/experiments.md §20).
    onednn_min_batch: int = 8
    # --- data ---
    dataset: str = "cifar10"
    # Pixels -> network inputs: "cifar" standardises each channel with CIFAR-10's mean and
    # deviation; "inception" scales to [-1, 1], what Keras' Inception v3 and weights
    # imported from it (train.py --init-from) expect.
    input_norm: str = "cifar"
    val_size: int = 6000           # held out of train: expert labels and calibration
    calib_size: int = 2000         # last part of val, kept for threshold calibration
    # Images of other sizes: "none" refuses them (all must be image_size square);
    # "resize_crop" resizes the shorter side to image_size and centre-crops, for training
    # and evaluation; "random_resized_crop" trains on Inception-style random crops (25-100%
    # of the area, aspect 3/4-4/3, streamed: new crops every epoch) and evaluates as
    # resize_crop.
    resize: str = "none"
    # Input path: "memory" decodes every split once into arrays (cached on disk), "stream"
    # reads files batch by batch through tf.data; "auto" streams when the decoded images
    # would take over a quarter of the machine's memory, or with random_resized_crop.
    pipeline: str = "auto"
    # Held-out split by groups: a regular expression on file names whose first group (or
    # whole match) names an image's group (a video, an object); whole groups are held out,
    # so near-identical images never sit on both sides. "" = images held out one by one.
    group_pattern: str = ""
    pad_crop: int = 2              # random-crop padding; light augmentation suits a short run
    # What the crop's padding holds: "zeros" (black pixels) or "reflect" (the image mirrored
    # at its border, airbench's choice).
    pad_mode: str = "zeros"
    # Progressive resizing: the first `lowres_epochs` epochs of the backbone stage train on
    # the augmented images downscaled to `lowres_size`; the rest, and every evaluation, at
    # image_size. A 24x24 step runs 1.9x faster here (bench/train_throughput.py), so 18
    # epochs (14 of them at 24x24) take 50 min where 12 at 32x32 took 58 (experiments.md §1).
    # 20 and 16 run too (the O1 head pads its map), 2.6x and 3.3x faster per step.
    lowres_size: int = 24          # 0 = off
    lowres_epochs: float = 14.0
    # Horizontal flips: "random" per view, "alternate" (each image mirrored in every other
    # epoch of the backbone stage, see augment.alternating_flips), or "none" where a mirror image
    # changes the class (signs, digits, text, left/right anatomy). See AUGMENTATIONS.
    flip: str = "alternate"
    # Class imbalance: "none", or "loss" (the backbone's cross-entropy weighted so that every
    # class weighs the same in total, from the training labels).
    class_balance: str = "none"
    # --- backbone stage ---
    # Batch 128 is not measurably faster than 256 here (bench/train_throughput.py, docs/
    # experiments.md §1) and ended level at equal epochs; it is the measured run's. lr scaled
    # linearly from 0.2 at 256.
    batch_size: int = 128
    epochs: int = 18               # 48 min on 2 CPU cores at width 0.25 (experiments.md §1)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2   # airbench's value
    warmup_epochs: float = 4.14    # triangular schedule peaking at 23% of training (airbench)
    # Where the triangle starts and ends, as fractions of the peak lr (airbench: 0.2, 0.07).
    lr_start: float = 0.0
    lr_end: float = 0.0
    aux_weight: float = 0.5        # loss = CE(O2) + aux_weight * CE(O1)
    # Exponential moving average of the weights and BatchNorm statistics, per step (0 = off).
    # When on, evaluation, the expert stage and the API use the averaged backbone.
    ema_decay: float = 0.99
    # Lookahead (airbench, after hlb-cifar10), 0 = off: every `lookahead_every` steps from
    # `lookahead_start` (a fraction of training) on, the EMA steps toward the weights with
    # decay ema_decay**lookahead_every * progress**3 and the weights are reset to it. airbench
    # pairs it with a fast BatchNorm momentum (0.6).
    lookahead_every: int = 0
    lookahead_start: float = 0.27
    bn_bias_lr_mult: float = 64.0  # lr multiplier on BatchNorm offsets (airbench's 64)
    eval_every_epochs: int = 1     # O1/O2 accuracy on the held-out images per epoch; 0 = off
    # With imported weights (train.py --init-from): "heads" freezes the imported trunk (its
    # BatchNorm statistics too) and trains only the new heads (O1, and O2 when the class
    # count differs from the imported classifier's); "all" fine-tunes everything.
    finetune: str = "heads"
    # --- expert stage ---
    # A short budget for configs where none was searched (the lrs were once chosen on the
    # calibration split, experiments.md §3, which Learn-then-Test then reuses: `cifar`
    # takes budgets chosen by cross-validation on the expert split instead, see _CIFAR).
    expert_epochs: int = 16
    expert_batch_size: int = 256
    expert_lr: float = 3e-3
    aux5b_lr: float = 1e-3         # the Auxiliary+5b expert's own Adam lr
    # The Auxiliary+5b expert's own epochs (0: expert_epochs). When the two differ, both
    # train together until the shorter budget ends, then only the other: each has the
    # schedule of its own budget, as experiments/expert_budget.py trains them apart.
    aux5b_epochs: int = 0
    expert_weight_decay: float = 1e-4
    # 0: every epoch augments the held-out images afresh and runs the frozen backbone on
    # them. N > 0: N augmented views of each image go through the backbone once, before
    # training, and the epochs read them (epochs / N passes over all N views, shuffled
    # together): many epochs then cost little more than N (expert_epochs must be a multiple
    # of N). experiments/expert_budget.py chose its settings this way, with 16 views.
    expert_views: int = 0
    # --- bookkeeping ---
    seed: int = 0
    checkpoint_every_steps: int = 200
    eval_batch_size: int = 500
    max_train_examples: int = 0    # >0: use only this many training images (tests, smoke runs)
    max_test_examples: int = 0

    def replace(self, **kw: Any) -> "Config":
        return dataclasses.replace(self, **kw)


_DEFAULT = Config()

# Faithful Inception v3 at 299x299 with the original widths (ImageNet-sized): the layers of
# keras.applications.InceptionV3 (cnneb_jax/keras_import.py reads its weights).
_FULL = _DEFAULT.replace(
    name="full", num_classes=1000, image_size=299, resize="random_resized_crop", width=1.0,
    padding="VALID", stem_stride=2, use_pool_5a=True, aux_pool=5, aux_pool_stride=3,
    expert_hidden=128, dataset="imagenet2012", batch_size=64, pad_crop=0, lowres_size=0,
    bn_momentum=0.99, identity_init=False)

# The CIFAR backbone trains 20 epochs (15 at 24x24, warmup at the same 23%): the faster step
# fits them in 54-58 min here, and held-out O2 rose 0.45 +- 0.43 pt over 18 (experiments.md
# §32). Its variants share it, so that --backbone-from pretrained/cifar accepts them.
_CIFAR_BACKBONE = _DEFAULT.replace(epochs=20, lowres_epochs=15.0, warmup_epochs=4.6)

# The shipped CIFAR model's experts at the budgets that experiments/expert_budget.py chose by
# 3-fold cross-validation on the expert split, 16 cached views (RESULTS §2, experiments.md
# §25): E1 Adam lr 0.27 for 2,048 epochs (4,096 and the neighbouring lrs fell back), Aux+5b
# lr 3e-3 for 8 epochs. Other configs keep the short defaults: nothing was searched there.
_CIFAR = _CIFAR_BACKBONE.replace(expert_views=16, expert_epochs=2048, expert_lr=0.27,
                                 aux5b_lr=3e-3, aux5b_epochs=8)

CONFIGS: dict[str, Config] = {
    "cifar": _CIFAR,
    # Second exit at Mixed_6e: m=3 outputs, 2 experts.
    "cifar_2exit": _CIFAR_BACKBONE.replace(name="cifar_2exit", branch_points=("Mixed_5b", "Mixed_6e")),
    # The E1 ablation: O1's logits, max probability, margin and entropy added to its inputs.
    "cifar_confidence": _CIFAR_BACKBONE.replace(name="cifar_confidence",
                                                expert_inputs="paper+confidence", expert_lr=0.03),
    "full": _FULL,
    # Imagenette (ImageNet photos of 10 classes) from its image folder, 3,000 training photos,
    # 600 held out (200 of them for calibration). Random resized crops (25-100% of a photo)
    # at 128x128 for 30 epochs, a stride-2 first conv: grids of 32 / 16 / 8 after the stem.
    # Chosen on the held-out photos (experiments.md §18): centre crops at 64x64 for 20 epochs
    # ended with O2 level with O1 (57.5% / 57.2%), random crops at 64 too (58.7% / 59.2%);
    # at 96 O2 led by 4.7, 1.3 and 2.3 points (seeds 0-2), at 128 by 4.0 and 4.5 (seeds 0-1).
    "imagenette": _DEFAULT.replace(
        name="imagenette", image_size=128, stem_stride=2, resize="random_resized_crop",
        val_size=600, calib_size=200, epochs=30, warmup_epochs=6.9, lowres_size=0,
        identity_init=False),
    # Transfer: the `full` Inception v3 started from Keras weights (train.py --init-from),
    # on imagenette-224's photos at their own 224x224 with Keras' [-1, 1] inputs. The
    # imported trunk stays frozen (finetune=heads), so a step runs the trunk forward only
    # and trains the new O1 and O2 heads: a few epochs at a modest lr.
    "imagenette_transfer": _FULL.replace(
        name="imagenette_transfer", num_classes=0, image_size=224, resize="resize_crop",
        dataset="imagenette", input_norm="inception", finetune="heads",
        val_size=600, calib_size=200, batch_size=32, epochs=3, lr=0.01, warmup_epochs=0.5,
        label_smoothing=0.1, ema_decay=0.0, bn_bias_lr_mult=1.0, eval_batch_size=64,
        expert_epochs=8, expert_batch_size=64),
    # Tiny: for tests on a handful of images.
    "tiny": _DEFAULT.replace(
        name="tiny", num_classes=10, width=0.0625, aux_channels=64, aux_hidden=128, expert_hidden=8,
        # Four blocks left out: the tests compile a third fewer convolutions; every block
        # kind stays.
        skip_blocks=("Mixed_5c", "Mixed_5d", "Mixed_6c", "Mixed_6d"),
        batch_size=8, epochs=8, eval_batch_size=16, checkpoint_every_steps=8,
        max_train_examples=48, max_test_examples=16,
        # The tests' schedule predates the CIFAR recipe's EMA, flips and smoothing. 48 steps
        # at lr 0.05 without smoothing: after 24 at lr 0.2, O2 could answer one class for
        # every image, and the expert tests then found no FT examples (on JAX 0.12).
        lr=0.05, label_smoothing=0.0, warmup_epochs=1.0, ema_decay=0.0, flip="random",
        bn_bias_lr_mult=1.0, lowres_size=0, identity_init=False,
        # 24 expert images (32 held out, 8 of them for calibration) in 30 full-batch steps
        # on a backbone of 48 steps (after too few, its logits are still huge): enough for a
        # test to see the expert learn FT vs Other.
        val_size=32, calib_size=8, expert_epochs=30, expert_batch_size=24, expert_lr=1e-2,
        expert_inputs="paper+confidence",
        aux5b_lr=1e-2),
}


# What each augmentation assumes about the data: the backbone stage prints the ones in use,
# so that a user sees which to turn off where an assumption fails.
AUGMENTATIONS: dict[str, tuple[str, str]] = {
    # field: (what it does, the symmetry it assumes)
    "flip": ("horizontal mirror", "a mirror image shows the same class (not so for signs, "
             "digits, text, left/right anatomy: --set flip=none)"),
    "pad_crop": ("random shift by up to pad_crop pixels", "a small shift keeps the class"),
    "resize": ("random 25-100% crops, aspect 3/4-4/3",
               "a part of the image keeps the class, at any scale"),
    "lowres_size": ("the first lowres_epochs at lowres_size pixels",
                    "a downscaled image shows the same class"),
}


def augmentations_in_use(cfg: "Config") -> list[str]:
    """One line per augmentation the config turns on: the field, what it does, what it
    assumes."""
    on = {"flip": cfg.flip != "none", "pad_crop": cfg.pad_crop > 0,
          "resize": cfg.resize == "random_resized_crop",
          "lowres_size": bool(cfg.lowres_size and cfg.lowres_epochs)}
    return [f"{k}={getattr(cfg, k)}: {AUGMENTATIONS[k][0]}; assumes {AUGMENTATIONS[k][1]}"
            for k, used in on.items() if used]


def parse_value(current: Any, text: str) -> Any:
    """Parses a `--set key=value` string to the type of the field's current value."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, tuple):
        return tuple(s for s in text.split(",") if s)
    return type(current)(text)


def get_config(name: str, overrides: dict[str, str] | None = None) -> Config:
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(Config)}
    for key, text in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown config field {key!r}; fields: {sorted(fields)}")
        try:
            value = parse_value(getattr(cfg, key), text)
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
        cfg = cfg.replace(**{key: value})
    validate(cfg)
    return cfg


# Ranges of the numeric fields: (low, high, low inclusive, high inclusive); None = unbounded.
_RANGES: dict[str, tuple] = {
    "num_classes": (0, None, True, True), "image_size": (8, None, True, True),
    "width": (0.0, None, False, True), "stem_stride": (1, None, True, True),
    "width_6": (0.0, None, True, True), "width_7": (0.0, None, True, True),
    "stem_channels": (0, None, True, True), "aux_pool": (1, None, True, True),
    "aux_pool_stride": (1, None, True, True), "aux_channels": (1, None, True, True),
    "aux_hidden": (1, None, True, True), "expert_hidden": (0, None, True, True),
    "dropout": (0.0, 1.0, True, False), "bn_momentum": (0.0, 1.0, True, False),
    "val_size": (0, None, True, True), "calib_size": (0, None, True, True),
    "pad_crop": (0, None, True, True), "lowres_size": (0, None, True, True),
    "lowres_epochs": (0.0, None, True, True), "batch_size": (1, None, True, True),
    "epochs": (1, None, True, True), "lr": (0.0, None, False, True),
    "momentum": (0.0, 1.0, True, False), "weight_decay": (0.0, None, True, True),
    "label_smoothing": (0.0, 1.0, True, False), "warmup_epochs": (0.0, None, True, True),
    "lr_start": (0.0, 1.0, True, True), "lr_end": (0.0, 1.0, True, True),
    "lookahead_every": (0, None, True, True), "lookahead_start": (0.0, 1.0, True, True),
    "aux_weight": (0.0, None, True, True), "ema_decay": (0.0, 1.0, True, False),
    "bn_bias_lr_mult": (0.0, None, False, True), "eval_every_epochs": (0, None, True, True),
    "expert_epochs": (1, None, True, True), "expert_batch_size": (1, None, True, True),
    "expert_lr": (0.0, None, False, True), "aux5b_lr": (0.0, None, False, True),
    "aux5b_epochs": (0, None, True, True),
    "expert_weight_decay": (0.0, None, True, True), "seed": (0, None, True, True),
    "expert_views": (0, None, True, True), "onednn_min_batch": (1, None, True, True),
    "checkpoint_every_steps": (1, None, True, True), "eval_batch_size": (1, None, True, True),
    "max_train_examples": (0, None, True, True), "max_test_examples": (0, None, True, True),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "padding": ("SAME", "VALID"),
    "compute_dtype": ("float32", "bfloat16", "bfloat16_deep", "float64"),
    "onednn": ("auto", "on", "off", "inference"),
    "expert_inputs": ("paper", "logits", "paper+confidence"),
    "flip": ("random", "alternate", "none"),
    "resize": ("none", "resize_crop", "random_resized_crop"),
    "pipeline": ("auto", "memory", "stream"), "pad_mode": ("zeros", "reflect"),
    "input_norm": ("cifar", "inception"), "finetune": ("heads", "all"),
    "class_balance": ("none", "loss"),
}


def _range_text(lo, hi, lo_in, hi_in) -> str:
    if hi is None:
        return f">= {lo}" if lo_in else f"> {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def validate(cfg: Config) -> None:
    """Checks every field's type and range; raises ValueError naming the field."""
    for f in dataclasses.fields(Config):
        value, default = getattr(cfg, f.name), getattr(_DEFAULT, f.name)
        kind = type(default)
        ok_type = (isinstance(value, bool) if kind is bool else
                   isinstance(value, (int, float)) and not isinstance(value, bool)
                   if kind is float else
                   isinstance(value, kind) and not isinstance(value, bool))
        if not ok_type:
            raise ValueError(f"config field {f.name} must be {kind.__name__}, "
                             f"got {value!r} ({type(value).__name__})")
        if f.name in _RANGES:
            lo, hi, lo_in, hi_in = _RANGES[f.name]
            inside = ((value >= lo if lo_in else value > lo) and
                      (hi is None or (value <= hi if hi_in else value < hi)))
            if not (inside and math.isfinite(value)):
                raise ValueError(f"config field {f.name} must be "
                                 f"{_range_text(lo, hi, lo_in, hi_in)}, got {value!r}")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise ValueError(f"config field {f.name} must be one of "
                             f"{', '.join(_CHOICES[f.name])}, got {value!r}")
    if cfg.num_classes == 1:
        raise ValueError("config field num_classes must be 0 (from the data) or >= 2, got 1")
    if cfg.group_pattern:
        try:
            re.compile(cfg.group_pattern)
        except re.error as e:
            raise ValueError(f"config field group_pattern is not a regular expression "
                             f"({e}): {cfg.group_pattern!r}") from None
    if cfg.val_size and cfg.calib_size >= cfg.val_size:
        raise ValueError(f"config field calib_size ({cfg.calib_size}) must be smaller than "
                         f"val_size ({cfg.val_size}): the calibration images are the last "
                         f"calib_size of the held-out ones, and the experts train on the rest")
    longest = max((cfg.expert_epochs, "expert_epochs"), (cfg.aux5b_epochs, "aux5b_epochs"))
    if cfg.expert_views and longest[0] % cfg.expert_views:
        raise ValueError(f"config field {longest[1]} ({longest[0]}) must be a multiple of "
                         f"expert_views ({cfg.expert_views}): every cached view is read equally")
    if cfg.pad_crop >= cfg.image_size:
        raise ValueError(f"config field pad_crop must be < image_size ({cfg.image_size}), "
                         f"got {cfg.pad_crop}")
    if cfg.lowres_size and not 8 <= cfg.lowres_size < cfg.image_size:
        raise ValueError(f"config field lowres_size must be 0 (off) or in [8, image_size "
                         f"({cfg.image_size})), got {cfg.lowres_size}")
    if cfg.whiten_stem and not 2 <= cfg.stem_channels <= 54:
        raise ValueError("config field stem_channels must be in [2, 54] with whiten_stem "
                         f"(both signs of at most 27 patch directions), got {cfg.stem_channels}")
    if cfg.lookahead_every and not cfg.ema_decay:
        raise ValueError("config field lookahead_every needs ema_decay > 0: the lookahead "
                         "resets the weights to their EMA")
    if not cfg.branch_points:
        raise ValueError("config field branch_points must name at least one Mixed_* block")
    for bp in cfg.branch_points:
        if bp not in BLOCKS or not bp.startswith("Mixed"):
            raise ValueError(f"branch point {bp!r} must be one of the Mixed_* blocks")
    for b in cfg.skip_blocks:
        if b not in SKIPPABLE or b in cfg.branch_points:
            raise ValueError(f"config field skip_blocks: {b!r} cannot be left out; choose from "
                             f"{', '.join(SKIPPABLE)}, not a branch point")
    if list(cfg.branch_points) != sorted(cfg.branch_points, key=BLOCKS.index):
        raise ValueError("branch_points must be in network order")
