"""Keras Inception v3 weights into the `full` config's variables.

`keras.applications.InceptionV3` and our `full` config have the same layers: 94 bias-free
convolutions, each followed by a BatchNorm without scale (eps 1e-3) and a ReLU, then a
global average pool and the `predictions` Dense. Keras names its layers by creation
order (`conv2d`, `conv2d_1`, ...), which is the order in which they run; ours run in the
order `conv_bn_order` records. So the n-th Keras conv/BatchNorm pair fills our n-th ConvBN.
Keras' model has no auxiliary head: O1 (and the experts) always start fresh.

Keras' Inception v3 expects inputs scaled to [-1, 1] (`preprocess_input`): a config that
imports its weights sets `input_norm="inception"`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax import tfenv
from cnneb_jax.configs import Config
from cnneb_jax.model import Model, Variables
from cnneb_jax.segments import ConvBN

# The `full` config's fields that Keras' architecture fixes (shapes alone would not show
# a different padding or stride).
KERAS_ARCHITECTURE = {"padding": "VALID", "stem_stride": 2, "use_pool_5a": True}


class KerasImportError(ValueError):
    """The Keras model or file does not fit the config (the message names the layer)."""


def conv_bn_order(model: Model) -> list[tuple[str, tuple[str, ...]]]:
    """(segment name, module path inside it) of every backbone ConvBN, in the order they
    run: recorded while the segments initialise abstractly (no numbers computed)."""
    order: list[tuple[str, tuple[str, ...]]] = []
    cfg = model.cfg
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    for name, seg in model.segments.items():
        def record(next_fn, args, kwargs, context, name=name):
            if isinstance(context.module, ConvBN) and context.method_name == "__call__":
                order.append((name, tuple(context.module.path)))
            return next_fn(*args, **kwargs)
        with nn.intercept_methods(record):
            variables = jax.eval_shape(seg.init, jax.random.PRNGKey(0), x)
        x = jax.eval_shape(seg.apply, variables, x)
    return order


def load_keras_model(source: Any):
    """A Keras model: `source` itself, or read from a `.keras` or `.h5` file."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.is_file():
        raise KerasImportError(f"{path} is not a file (a Keras .keras or .h5 model)")
    if path.suffix not in (".keras", ".h5"):
        raise KerasImportError(f"{path}: expected a Keras model file ending in .keras or .h5")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    tfenv.quiet()
    import keras
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a file it cannot read
        raise KerasImportError(f"{path} could not be read as a Keras model "
                           f"({type(e).__name__}: {str(e)[:300]})") from None


def _creation_index(name: str) -> tuple[int, str]:
    # "conv2d" -> 0, "conv2d_17" -> 17: Keras' default names count up as layers are made.
    m = re.search(r"_(\d+)$", name)
    return (int(m.group(1)) if m else 0, name)


def keras_conv_bn_pairs(kmodel) -> list[tuple[Any, Any]]:
    """Keras' (Conv2D, BatchNormalization) pairs in creation order; each BatchNorm is the
    one layer that reads its conv's output."""
    tfenv.quiet()
    import keras
    convs = [l for l in kmodel.layers if isinstance(l, keras.layers.Conv2D)]
    convs.sort(key=lambda l: _creation_index(l.name))
    pairs = []
    for conv in convs:
        users = [node.operation for node in conv._outbound_nodes]
        bns = [u for u in users if isinstance(u, keras.layers.BatchNormalization)]
        if len(users) != 1 or not bns:
            raise KerasImportError(f"Keras layer {conv.name} is not followed by one "
                               "BatchNormalization: not an Inception v3 conv block")
        pairs.append((conv, bns[0]))
    return pairs


def _shape(a) -> str:
    return "x".join(str(int(d)) for d in a.shape)


def _classifier(kmodel):
    """The Dense on the pooled features (Keras: `predictions`), or None (include_top=False)."""
    tfenv.quiet()
    import keras
    dense = [l for l in kmodel.layers if isinstance(l, keras.layers.Dense)]
    return dense[-1] if dense else None


def check_architecture(cfg: Config) -> None:
    wrong = {k: getattr(cfg, k) for k, v in KERAS_ARCHITECTURE.items() if getattr(cfg, k) != v}
    if wrong:
        raise KerasImportError(f"config {cfg.name!r} differs from Keras' Inception v3 in "
                           + ", ".join(f"{k}={v!r} (Keras: {KERAS_ARCHITECTURE[k]!r})"
                                       for k, v in wrong.items())
                           + "; start from the `full` config")


def import_keras(source: Any, model: Model, variables: Variables) -> tuple[Variables, dict]:
    """`variables` with every backbone segment (and O2, when the Keras classifier has the
    config's class count) replaced by the weights of a Keras Inception v3: a Keras model,
    or a `.keras` / `.h5` file. Returns (variables, report): the report says which parts
    were imported and which start fresh. Raises KerasImportError naming the first layer that
    does not match."""
    check_architecture(model.cfg)
    kmodel = load_keras_model(source)
    pairs = keras_conv_bn_pairs(kmodel)
    order = conv_bn_order(model)
    out = jax.tree_util.tree_map(lambda a: a, variables)  # fresh containers
    for (conv, bn), (seg, path) in zip(pairs, order):
        params, stats = out["segments"][seg]["params"], out["segments"][seg]["batch_stats"]
        for key in path:
            params, stats = params[key], stats[key]
        where = f"{'/'.join(path)} (segment {seg})"
        if conv.use_bias or len(conv.weights) != 1:
            raise KerasImportError(f"Keras layer {conv.name} has a bias; {where} has none")
        kernel = np.asarray(conv.kernel)
        ours = params["conv"]["kernel"]
        if kernel.shape != tuple(ours.shape):
            raise KerasImportError(f"Keras layer {conv.name} (kernel {_shape(kernel)}) does "
                                   f"not match {where} (kernel {_shape(ours)})")
        if bn.scale or not bn.center:
            raise KerasImportError(f"Keras layer {bn.name} has a scale (gamma) or no offset; "
                                   f"{where}'s BatchNorm has an offset only")
        if not np.isclose(bn.epsilon, 1e-3):
            raise KerasImportError(f"Keras layer {bn.name} has epsilon {bn.epsilon}; ours 1e-3")
        params["conv"]["kernel"] = jnp.asarray(kernel, ours.dtype)
        params["bn"]["bias"] = jnp.asarray(np.asarray(bn.beta), ours.dtype)
        stats["bn"]["mean"] = jnp.asarray(np.asarray(bn.moving_mean), jnp.float32)
        stats["bn"]["var"] = jnp.asarray(np.asarray(bn.moving_variance), jnp.float32)
    if len(pairs) < len(order):
        seg, path = order[len(pairs)]
        raise KerasImportError(f"the Keras model has {len(pairs)} conv layers, ours "
                               f"{len(order)}: nothing matches {'/'.join(path)} (segment {seg})")
    if len(pairs) > len(order):
        raise KerasImportError(f"the Keras model has {len(pairs)} conv layers, ours "
                               f"{len(order)}: {pairs[len(order)][0].name} has no counterpart")
    report = {"segments": list(model.segments), "conv_layers": len(pairs), "fresh": ["O1"]}
    last = f"O{model.num_exits}"
    dense = _classifier(kmodel)
    logits = out["heads"][last]["params"]["Logits"]
    if dense is not None and tuple(dense.kernel.shape) == tuple(logits["kernel"].shape):
        logits["kernel"] = jnp.asarray(np.asarray(dense.kernel), logits["kernel"].dtype)
        logits["bias"] = jnp.asarray(np.asarray(dense.bias), logits["bias"].dtype)
        report["heads"] = [last]
    else:
        report["heads"] = []
        report["fresh"].append(last)
        report["why_fresh"] = ("the Keras model has no classifier" if dense is None else
                               f"Keras' classifier {dense.name} has {dense.kernel.shape[-1]} "
                               f"classes, the config {model.cfg.num_classes}")
    report["fresh"] += [f"E{i + 1}" for i in range(model.num_exits - 1)]
    return out, report


def random_keras_model(size: int | None = None, classes: int = 1000, seed: int = 0,
                       bn_images: np.ndarray | None = None, perturb_bn: bool = False,
                       batch_size: int = 32):
    """A Keras Inception v3 with random weights (`weights=None`, logits out): to try the
    import and transfer path where no pretrained file can be downloaded, and to test it.
    With `bn_images` (uint8, N x size x size x 3) its BatchNorm statistics are first set
    from them (training-mode passes, so each layer sees normalised inputs): the random
    features then have the scale trained statistics give, instead of growing through 94
    layers. `perturb_bn` draws random offsets and statistics instead, so that a wrong
    mapping of them shows in the logits (tests)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    tfenv.quiet()
    import keras
    keras.utils.set_random_seed(seed)
    km = keras.applications.InceptionV3(
        weights=None, input_shape=None if size is None else (size, size, 3), classes=classes,
        classifier_activation=None)
    bns = [l for l in km.layers if isinstance(l, keras.layers.BatchNormalization)]
    if perturb_bn:
        rng = np.random.default_rng(seed)
        for layer in bns:
            n = layer.beta.shape[0]
            layer.beta.assign(rng.normal(0, 0.5, n))
            layer.moving_mean.assign(rng.normal(0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
    if bn_images is not None:
        for momentum in (0.0, 0.5, 0.9):   # the first batch sets them, later ones average
            for layer in bns:
                layer.momentum = momentum
            for start in range(0, len(bn_images), batch_size):
                x = bn_images[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
                km(x, training=True)
        for layer in bns:
            layer.momentum = 0.99
    return km


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    p = argparse.ArgumentParser(
        prog="python -m cnneb_jax.keras_import",
        description="Check a Keras Inception v3 file against a config, or write one with "
                    "random weights to try --init-from where nothing can be downloaded.")
    sub = p.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="import FILE into CONFIG and print what was read")
    check.add_argument("file")
    check.add_argument("--config", default="full")
    check.add_argument("--num-classes", type=int, default=1000)
    rand = sub.add_parser("random", help="write a random-weight Keras Inception v3 to OUT")
    rand.add_argument("out")
    rand.add_argument("--bn-from", default=None, metavar="DIR",
                      help="set its BatchNorm statistics from the images of DIR's train/ "
                           "split (resized to --size)")
    rand.add_argument("--size", type=int, default=224)
    rand.add_argument("--images", type=int, default=512)
    args = p.parse_args(argv)
    try:
        if args.cmd == "check":
            from cnneb_jax.configs import get_config
            from cnneb_jax.model import abstract_variables, build_model
            cfg = get_config(args.config, {"num_classes": str(args.num_classes)})
            model = build_model(cfg)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                           abstract_variables(model))
            print(import_keras(args.file, model, zeros)[1])
        else:
            images = None
            if args.bn_from:
                from cnneb_jax.data import list_images, read_image
                files = list_images(Path(args.bn_from) / "train")
                pick = np.random.default_rng(0).permutation(len(files))[:args.images]
                images = np.stack([read_image(files[i], args.size, "resize_crop")
                                   for i in sorted(pick)])
            random_keras_model(args.size if images is not None else None,
                               bn_images=images).save(args.out)
            print(f"wrote {args.out}")
    except (KerasImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
