"""The CNN-EB: backbone segments, exits O1..Om and experts E1..E(m-1), as explicit pytrees.

Variables are a plain dict:
    {"segments": {"stem->Mixed_5b": {...}, "Mixed_5b->end": {...}},
     "heads":    {"O1": {...}, "O2": {...}},
     "experts":  {"E1": {...}},          # the proposed expert (concat with O1)
     "aux5b":    {"E1": {...}}}          # the "Auxiliary+5b" expert
each leaf dict holding Flax collections "params" and "batch_stats".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Collection

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax.configs import Config
from cnneb_jax.augment import normalize
from cnneb_jax.heads import Aux5bExpert, AuxHead, ExpertHead, MainHead
from cnneb_jax.segments import Segment

Variables = dict[str, Any]
BACKBONE_GROUPS = ("segments", "heads")
EXPERT_GROUPS = ("experts", "aux5b")


def segment_bounds(cfg: Config) -> list[tuple[str | None, str | None]]:
    pts = list(cfg.branch_points)
    return list(zip([None] + pts, pts + [None]))


def segment_name(start: str | None, end: str | None) -> str:
    return f"{start or 'stem'}->{end or 'end'}"


@dataclasses.dataclass(frozen=True)
class Model:
    """Static structure (Flax modules); the numbers live in a separate Variables dict."""
    cfg: Config
    segments: dict[str, Segment]
    heads: dict[str, Any]
    experts: dict[str, ExpertHead]
    aux5b: dict[str, Aux5bExpert]

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def segment_names(self) -> list[str]:
        return list(self.segments)


def build_model(cfg: Config) -> Model:
    if cfg.num_classes == 0:
        raise ValueError("config num_classes is 0 (taken from the data): resolve it with "
                         "splits.with_classes, or --set num_classes=N")
    bounds = segment_bounds(cfg)
    m = len(bounds)
    # Each module computes in the dtype of its own config (`part_config`).
    deep = part_config(cfg, first_segment=False)
    segments = {segment_name(s, e): Segment(part_config(cfg, j == 0), s, e)
                for j, (s, e) in enumerate(bounds)}
    heads = {f"O{i + 1}": AuxHead(deep) for i in range(m - 1)}
    heads[f"O{m}"] = MainHead(deep)
    experts = {f"E{i + 1}": ExpertHead(deep) for i in range(m - 1)}
    aux5b = {f"E{i + 1}": Aux5bExpert(deep) for i in range(m - 1)}
    return Model(cfg, segments, heads, experts, aux5b)


def part_config(cfg: Config, first_segment: bool) -> Config:
    """The config of one part of the model: `bfloat16_deep` computes segment 0 in float32
    and every other part in bfloat16; every other compute dtype is the whole model's."""
    if cfg.compute_dtype != "bfloat16_deep":
        return cfg
    return cfg.replace(compute_dtype="float32" if first_segment else "bfloat16")


def init_variables(model: Model, rng: jax.Array, init_segments: bool = True) -> Variables:
    """Fresh variables of every part. `init_segments=False` leaves the backbone segments
    at zeros, for callers that overwrite or ignore them (imported weights, the expert
    stage): initialising the `full` trunk takes about 30 s here. Every other part gets
    the same numbers either way."""
    cfg = model.cfg
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    keys = iter(jax.random.split(rng, 4 * model.num_exits))
    out: Variables = {"segments": {}, "heads": {}, "experts": {}, "aux5b": {}}
    feats = []
    for name, seg in model.segments.items():
        key = next(keys)
        if init_segments:
            out["segments"][name] = seg.init(key, x)
            x = seg.apply(out["segments"][name], x)
        else:
            shapes = jax.eval_shape(seg.init, key, x)
            out["segments"][name] = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            x = jnp.zeros(jax.eval_shape(seg.apply, shapes, x).shape, x.dtype)
        feats.append(x)
    for i, (name, head) in enumerate(model.heads.items()):
        out["heads"][name] = head.init(next(keys), feats[i])
    for i, name in enumerate(model.experts):
        o = jnp.zeros((1, cfg.num_classes), jnp.float32)
        out["experts"][name] = model.experts[name].init(next(keys), feats[i], o)
        out["aux5b"][name] = model.aux5b[name].init(next(keys), feats[i])
    out = jax.tree_util.tree_map(jnp.asarray, out)
    if cfg.compute_dtype == "float64":
        if not jax.config.jax_enable_x64:
            raise ValueError("compute_dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1")
        out = jax.jit(lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), t))(out)
    return out


def whitening_kernel(images: np.ndarray, channels: int, size: int = 3,
                     eps: float = 5e-4, input_norm: str = "cifar") -> np.ndarray:
    """A (size, size, 3, channels) kernel that maps each size x size patch of the normalised
    images onto the top channels/2 eigenvectors of the patch covariance, each scaled to unit
    variance, with both signs (so the ReLU after it keeps every direction). Airbench's frozen
    first layer: later layers start from decorrelated inputs."""
    x = np.asarray(normalize(images, input_norm), np.float64)
    patches = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, size * size * x.shape[-1])
    patches = patches - patches.mean(0)
    eigval, eigvec = np.linalg.eigh(patches.T @ patches / len(patches))
    k = (channels + 1) // 2
    if k > len(eigval):
        raise ValueError(f"{channels} whitening channels need more than {len(eigval)} "
                         "patch directions")
    top = eigvec[:, ::-1][:, :k] / np.sqrt(eigval[::-1][:k] + eps)
    w = np.concatenate([top, -top], axis=1)[:, :channels]
    return w.reshape(size, size, x.shape[-1], channels).astype(np.float32)


def dirac_kernel(kernel: jax.Array) -> jax.Array:
    """An HWIO conv kernel with its first min(in, out) output channels set to the identity
    (a centred Dirac kernel), the rest unchanged."""
    kh, kw, cin, cout = kernel.shape
    k = min(cin, cout)
    eye = jnp.zeros((kh, kw, cin, k), kernel.dtype).at[kh // 2, kw // 2].set(
        jnp.eye(cin, k, dtype=kernel.dtype))
    return kernel.at[..., :k].set(eye)


def identity_kernels(params: Variables) -> Variables:
    """`params` with every backbone conv kernel passed through `dirac_kernel`: airbench's
    "identity init", so that each plain conv starts as an implicit residual and a deep
    narrow trunk passes its input through from the first step."""
    def dirac(path, leaf):
        if getattr(path[-1], "key", None) != "kernel" or leaf.ndim != 4:
            return leaf
        return dirac_kernel(leaf)
    return {**params, "segments": jax.tree_util.tree_map_with_path(dirac, params["segments"])}


def abstract_variables(model: Model, seed: int = 0) -> Variables:
    """Shapes and dtypes of `init_variables` without computing them: restoring and shape
    checks need only the structure, and eager initialisation of every layer takes about
    20 s for the cifar config."""
    from cnneb_jax.compile_cache import memo_json

    def shapes():
        tree = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(seed)))
        return jax.tree_util.tree_map(lambda a: [list(a.shape), a.dtype.name], tree)

    def rebuild(node):
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        return jax.ShapeDtypeStruct(tuple(node[0]), jnp.dtype(node[1]))
    # Shapes do not depend on the seed; tracing init takes seconds for the cifar config.
    key = json.dumps(dataclasses.asdict(model.cfg), sort_keys=True)
    return rebuild(memo_json("variables", key, shapes))


def split_collections(variables: Variables) -> tuple[Variables, Variables]:
    """{group: {name: {"params", "batch_stats"}}} -> (params tree, batch_stats tree)."""
    params = {g: {n: v["params"] for n, v in d.items()} for g, d in variables.items()}
    stats = {g: {n: v.get("batch_stats", {}) for n, v in d.items()} for g, d in variables.items()}
    return params, stats


def merge_collections(params: Variables, stats: Variables) -> Variables:
    out: Variables = {}
    for g, d in params.items():
        out[g] = {}
        for n, p in d.items():
            s = stats[g][n]
            out[g][n] = {"params": p, "batch_stats": s} if s else {"params": p}
    return out


def backbone_forward(model: Model, params: Variables, stats: Variables, x: jax.Array,
                     train: bool, rng: jax.Array | None = None,
                     frozen: Collection[str] = ()):
    """Runs all segments and exits O1..Om. Returns (list of logits, features, new
    batch_stats). `frozen` names parts ("segments", or "heads/O2") that run in eval mode
    with their variables held constant (imported weights, `Config.finetune`): no gradient
    flows into them and their BatchNorm statistics stay as they are."""
    new_stats = {"segments": {}, "heads": {}}
    feats = []

    def run(group, name, module, h):
        p, s = params[group][name], stats[group][name]
        if is_frozen(group, name, frozen):
            p, s = jax.lax.stop_gradient((p, s))
            return _apply(module, p, s, False, None, h)
        return _apply(module, p, s, train, rng, h)

    for name, seg in model.segments.items():
        x, new_stats["segments"][name] = run("segments", name, seg, x)
        feats.append(x)
    logits = []
    for i, (name, head) in enumerate(model.heads.items()):
        y, new_stats["heads"][name] = run("heads", name, head, feats[i])
        logits.append(y)
    return logits, feats, new_stats


def is_frozen(group: str, name: str, frozen: Collection[str]) -> bool:
    return group in frozen or f"{group}/{name}" in frozen


def to_compute_dtype(cfg: Config, tree: Any) -> Any:
    """Mixed precision: float32 master parameters (and inputs) are cast to the compute
    dtype where they are used, so gradients and optimizer state stay float32. BatchNorm
    statistics stay float32 too (Flax computes them in at least float32)."""
    if cfg.compute_dtype == "float32":
        return tree
    if cfg.compute_dtype == "bfloat16_deep":
        raise ValueError("compute_dtype bfloat16_deep differs by part: cast with each "
                         "module's config (model.part_config)")
    dt = jnp.dtype(cfg.compute_dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def inference_variables(cfg: Config, variables: Variables) -> Variables:
    """The parameters cast to the compute dtype once, at load, rather than in every call
    (at bfloat16 the casts took 30 ms of a 300 ms `full` forward at batch 8; docs/experiments.md
    §15). BatchNorm statistics stay float32; the numbers are the calls' own casts."""
    if cfg.compute_dtype == "float32":
        return variables
    first = ("segments", segment_name(*segment_bounds(cfg)[0]))
    cast = lambda group, name, tree: to_compute_dtype(
        part_config(cfg, (group, name) == first), tree)
    return {group: {name: {col: cast(group, name, tree) if col == "params" else tree
                           for col, tree in v.items()}
                    for name, v in parts.items()}
            for group, parts in variables.items()}


def _logits_f32(y: jax.Array) -> jax.Array:
    # Heads and experts return (N, classes) logits: losses and softmaxes run in at least
    # float32 (float64 stays float64).
    return y.astype(jnp.float32) if y.ndim == 2 and y.dtype.itemsize < 4 else y


def _apply(module, params, stats, train, rng, *args):
    params, args = to_compute_dtype(module.cfg, (params, args))
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    rngs = {"dropout": rng} if (train and rng is not None) else None
    if train and stats:
        y, upd = module.apply(variables, *args, train=True, mutable=["batch_stats"], rngs=rngs)
        return _logits_f32(y), upd["batch_stats"]
    return _logits_f32(module.apply(variables, *args, train=train, rngs=rngs)), stats


def expert_forward(model: Model, params: Variables, stats: Variables, kind: str, index: int,
                   feat: jax.Array, o1_logits: jax.Array, train: bool):
    """Expert logits {FT, Other} of expert `kind` ("experts" or "aux5b") at exit `index`."""
    name = f"E{index + 1}"
    module = getattr(model, kind)[name]
    args = (feat, o1_logits) if kind == "experts" else (feat,)
    return _apply(module, params[kind][name], stats[kind][name], train, None, *args)


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def eval_apply(module, variables: Variables, *args):
    """A module in eval mode at the config's compute dtype, logits in float32."""
    params, args = to_compute_dtype(module.cfg, (variables["params"], args))
    return _logits_f32(module.apply({**variables, "params": params}, *args, train=False))


def segment_fns(model: Model) -> dict[str, Any]:
    """Eval-mode functions, one per segment/head/expert, each jit-compiled on its own
    (export and tests; the early-exit controller runs `branch_fn` programs).

    seg:<name>(vars, x) -> features; head:<O_i>(vars, feats) -> logits;
    expert:<E_i>(vars, feats, o_logits) -> logits; aux5b:<E_i>(vars, feats) -> logits.
    """
    def eval_fn(module):
        return jax.jit(lambda v, *args: eval_apply(module, v, *args))

    fns: dict[str, Any] = {}
    for name, seg in model.segments.items():
        fns[f"seg:{name}"] = eval_fn(seg)
    for name, head in model.heads.items():
        fns[f"head:{name}"] = eval_fn(head)
    for name, e in model.experts.items():
        fns[f"expert:{name}"] = eval_fn(e)
    for name, e in model.aux5b.items():
        fns[f"aux5b:{name}"] = eval_fn(e)
    return fns


# What a branch program computes after segment i: "seg" nothing more; "plain" exit O_{i+1};
# "expert" / "aux5b" that exit and one expert; "all" the exit and both experts.
BRANCH_VARIANTS = ("seg", "plain", "expert", "aux5b", "all")


def branch_fn(model: Model, i: int, variant: str):
    """The pure function of one branch point, to be compiled as one program: segment i
    (from pixels when i = 0: uint8, or float in [0, 255], cast and standardised on the
    device), then what `variant` names. Returns the features (except after the last
    segment) and one small array: the exit's logits with the expert logits appended
    ([o | e], [o | a] or [o | e | a]); "seg" returns the features alone."""
    if variant not in BRANCH_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {BRANCH_VARIANTS}")
    seg_name, seg = list(model.segments.items())[i]
    head_name, head = list(model.heads.items())[i]
    last = i == model.num_exits - 1
    expert = f"E{i + 1}"

    def run(v: Variables, x: jax.Array):
        if i == 0:
            x = normalize(x, model.cfg.input_norm)
        h = eval_apply(seg, v["segments"][seg_name], x)
        if variant == "seg":
            return h
        parts = [eval_apply(head, v["heads"][head_name], h)]
        if not last and variant in ("expert", "all"):
            parts.append(eval_apply(model.experts[expert], v["experts"][expert], h, parts[0]))
        if not last and variant in ("aux5b", "all"):
            parts.append(eval_apply(model.aux5b[expert], v["aux5b"][expert], h))
        small = jnp.concatenate(parts, -1) if len(parts) > 1 else parts[0]
        return small if last else (h, small)
    return run
