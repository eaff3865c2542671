"""A trained cascade (`Cascade`) and its compiled programs.

One program per branch point and bucket size runs the segment, its exit and the rule's
expert (`model.branch_fn`), traced once with a symbolic batch axis and lowered per bucket;
small programs gather rows, cast uint8 pixels and keep the controller's device queues.
`warm_up` compiles every program routing can reach, so nothing compiles afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax import onednn, routing
from cnneb_jax.compile_cache import memo, memo_json
from cnneb_jax.metrics import segment_flops
from cnneb_jax.model import (Model, Variables, branch_fn, build_model, inference_variables,
                             segment_fns)
from cnneb_jax.recheck import Recheck


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to 32, then steps of max(32, max_batch/8): padding wastes little."""
    sizes = {b for b in (1, 2, 4, 8, 16, 32) if b < max_batch}
    step = max(32, math.ceil(max_batch / 8))
    sizes.update(range(step, max_batch, step))
    sizes.add(max_batch)
    return tuple(sorted(sizes))


@dataclasses.dataclass(frozen=True)
class Cascade:
    """A trained CNN-EB ready to route: variables (on the device), buckets, the compiled
    branch programs, and the FLOPs per image of every part (for the cost of each sample's
    path). `fns` holds the per-part jitted functions that export.py writes out."""
    model: Model
    variables: Variables
    fns: dict[str, Callable]
    buckets: tuple[int, ...]
    flops: dict[str, float]
    # Where it was loaded from (api.calibrate stores the chosen point there) and the point
    # (rule, threshold, ...) that api.predict uses when it is given neither.
    workdir: Path | None = None
    operating_point: dict = dataclasses.field(default_factory=dict)
    class_names: tuple[str, ...] | None = None   # in label order, when the workdir has them
    # bfloat16_checked (recheck.py): the float32 cascade and the margins below which an
    # answer is rerun in it; None answers as computed.
    recheck: Recheck | None = None
    # (program, input shapes and dtypes) -> compiled executable; filled by warm_up or on
    # first use, so a routed call never traces or compiles twice.
    programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]


def make_cascade(model: Model, variables: Variables, max_batch: int = 256,
                 workdir: Path | None = None, operating_point: dict | None = None) -> Cascade:
    key = json.dumps(dataclasses.asdict(model.cfg), sort_keys=True)
    flops = memo_json("flops", key, lambda: segment_flops(model, variables))
    variables = inference_variables(model.cfg, variables)
    return Cascade(model, jax.device_put(variables), dict(segment_fns(model)),
                   bucket_sizes(max_batch), flops, workdir, dict(operating_point or {}))


# The branch program each rule routes with: the scores of max_softmax, entropy and the
# oracle come from the exit's logits alone, so they share "plain".
RULE_VARIANT = {"expert": "expert", "aux5b": "aux5b", "max_softmax": "plain",
                "entropy": "plain", "oracle": "plain"}


def _take(h: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(h, idx, axis=0)


def _put(buf: jax.Array, h: jax.Array, idx: jax.Array, offset: jax.Array,
         count: jax.Array) -> jax.Array:
    """Rows idx[:count] of h written to buf[offset:offset + count]; the rest of idx pads."""
    j = jnp.arange(idx.shape[0])
    target = jnp.where(j < count, offset + j, buf.shape[0])   # out of range: dropped
    return buf.at[target].set(jnp.take(h, idx, axis=0), mode="drop")


def _to_float(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _spec(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _branch_variables(c: Cascade, i: int, variant: str) -> Variables:
    """Only the variables branch program (i, variant) reads: every leaf passed costs time
    when the program is lowered and when it is called."""
    key = ("variables", i, variant)
    v = c.programs.get(key)
    if v is None:
        seg, head = list(c.model.segments)[i], list(c.model.heads)[i]
        expert, last = f"E{i + 1}", i == c.model.num_exits - 1
        v = {"segments": {seg: c.variables["segments"][seg]}}
        if variant != "seg":
            v["heads"] = {head: c.variables["heads"][head]}
        if not last and variant in ("expert", "all"):
            v["experts"] = {expert: c.variables["experts"][expert]}
        if not last and variant in ("aux5b", "all"):
            v["aux5b"] = {expert: c.variables["aux5b"][expert]}
        c.programs[key] = v
    return v


def _kernel_model(c: Cascade, batch: int) -> Model:
    """The model whose kernels run a bucket of `batch`: the cascade's own, or below
    `onednn_min_batch` the same network on XLA's kernels (faster there than oneDNN's).
    Both read the same variables."""
    cfg = c.model.cfg
    if cfg.onednn == "off" or batch >= cfg.onednn_min_batch:
        return c.model
    model = c.programs.get(("model", "xla"))
    if model is None:
        model = c.programs[("model", "xla")] = build_model(cfg.replace(onednn="off"))
    return model


def _exported(c: Cascade, i: int, variant: str, x) -> jax.export.Exported:
    """Branch program (i, variant) traced once for any batch size (a symbolic batch axis):
    lowering it for each bucket then costs a fraction of tracing the Flax model again."""
    model = _kernel_model(c, x.shape[0])
    # Per kernel library: with oneDNN's the program calls them (FFI custom calls,
    # registered by onednn.use before they are compiled).
    kernels = "onednn" if onednn.use(model.cfg.onednn, jnp.float32) else "xla"
    key = ("export", i, variant, _signature(x)[0][1:], _signature(x)[1], kernels)
    exp = c.programs.get(key)
    if exp is None:
        batch, = jax.export.symbolic_shape("b")
        spec = jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), x.dtype)
        fn = jax.jit(branch_fn(model, i, variant))
        specs = jax.tree_util.tree_map(_spec, _branch_variables(c, i, variant))
        # Traced once per config on this machine (memoised with the compilation cache).
        memo_key = json.dumps([dataclasses.asdict(model.cfg), key[1:4], str(key[4]),
                               jax.default_backend(), kernels], sort_keys=True, default=str)
        checks = onednn.export_checks() if kernels == "onednn" else ()
        exp = c.programs[key] = memo(
            "branch", memo_key,
            lambda: jax.export.export(fn, disabled_checks=checks)(specs, spec).serialize(),
            lambda blob: jax.export.deserialize(bytearray(blob)))
    return exp


def _lower(c: Cascade, key: tuple, x):
    if key[0] == "take":
        return jax.jit(_take).lower(*x)
    if key[0] == "put":   # the queue's buffer is updated in place
        return jax.jit(_put, donate_argnums=0).lower(*x)
    if key[0] == "zeros":
        return jax.jit(lambda: jnp.zeros(x.shape, x.dtype)).lower()
    if key[0] == "pixels":
        return jax.jit(_to_float).lower(x)
    _, i, variant = key
    return jax.jit(_exported(c, i, variant, x).call).lower(_branch_variables(c, i, variant), x)


def _compile(lowered):
    # On XLA:CPU, LLVM's backend optimisation level 1 compiles our programs about 30%
    # faster than the default (2) and runs them no slower (measured on the cifar cascade,
    # docs/experiments.md section 10): convolutions and matmuls are library calls either way.
    # A level the user set in XLA_FLAGS wins (the test suite sets 0).
    if (jax.default_backend() == "cpu"
            and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 1})
    return lowered.compile()


def _signature(x) -> tuple:
    return tuple((a.shape, jnp.dtype(a.dtype).name) for a in x) if isinstance(x, tuple) \
        else (x.shape, jnp.dtype(x.dtype).name)


def _program(c: Cascade, key: tuple, x) -> Callable:
    """The compiled program `key` for the shapes and dtypes of `x` (compiled on first use)."""
    k = key + (_signature(x),)
    prog = c.programs.get(k)
    if prog is None:
        prog = c.programs[k] = _compile(_lower(c, key, x))
    return prog


def branch(c: Cascade, i: int, variant: str, x):
    """Runs branch program (i, variant) on pixels (i = 0) or features; see model.branch_fn.
    uint8 pixels reach the device as uint8 and are cast there. Dispatch is asynchronous:
    the result is a device array the host may read later."""
    if i == c.model.num_exits - 1 and variant != "seg":
        variant = "plain"   # no expert after the last segment
    if i == 0 and x.dtype != np.float32:
        x = _program(c, ("pixels",), x)(x)
    return _program(c, ("branch", i, variant), x)(_branch_variables(c, i, variant), x)


def gather(c: Cascade, h: jax.Array, idx: np.ndarray) -> jax.Array:
    """Rows `idx` of device features `h`, on the device."""
    return _program(c, ("take",), (h, idx))(h, idx)


def zeros(c: Cascade, spec: jax.ShapeDtypeStruct) -> jax.Array:
    """A device buffer of zeros (a queue's), through a compiled program."""
    return _program(c, ("zeros",), spec)()


def put(c: Cascade, buf: jax.Array, h: jax.Array, rows: np.ndarray, offset: int) -> jax.Array:
    """`buf` (donated: updated in place) with rows `rows` of device features `h` written
    from row `offset` on."""
    idx = routing.pad_rows(rows.astype(np.int32), h.shape[0])
    args = (buf, h, idx, np.int32(offset), np.int32(len(rows)))
    return _program(c, ("put",), args)(*args)


def bucket_for(c: Cascade, n: int) -> int:
    return routing.bucket_for(c.buckets, n)


def pixels(images) -> np.ndarray:
    """uint8 stays uint8 (cast on the device); anything else becomes float32 in [0, 255]."""
    x = np.asarray(images)
    return x if x.dtype == np.uint8 else x.astype(np.float32)


ROUTED_RULES = ("expert", "aux5b", "max_softmax", "entropy")


def warm_up(c: Cascade, rules: tuple[str, ...] = ROUTED_RULES, workers: int | None = None,
            reference: bool = False) -> int:
    """Compiles, without running them, the programs `run_cascade` can reach for `rules`:
    every branch program at every bucket size, the cast of uint8 pixels, every gather
    routing can run (from a bucket to the same or a smaller one: the samples that go on are
    never more than those that came in) and the queue's programs; with `reference`, also
    those of `run_plain` (each segment alone, each exit without its expert), so that a
    timed reference starts as warm as the cascade. Lowering runs here in turn; compiling
    (or reading the persistent cache) in `workers` threads meanwhile. Returns the number
    of programs."""
    cfg, m = c.model.cfg, c.model.num_exits
    variants = {RULE_VARIANT[r] for r in rules} | ({"seg", "plain"} if reference else set())
    variants = sorted(variants)
    # Each segment's input (pixels, then features) for one image, traced once.
    inputs = [jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)]
    for i in range(m - 1):
        inputs.append(jax.eval_shape(branch_fn(c.model, i, "seg"), c.variables, inputs[-1]))
    todo: dict[tuple, tuple] = {}
    for p in c.buckets:
        x = jax.ShapeDtypeStruct((p,) + inputs[0].shape[1:], jnp.uint8)
        todo[("pixels", _signature(x))] = x
        for i in range(m):
            x = jax.ShapeDtypeStruct((p,) + inputs[i].shape[1:], inputs[i].dtype)
            for v in variants:
                key = ("branch", i, v if i < m - 1 else "plain")
                todo[key + (_signature(x),)] = x
            if i < m - 1:
                x = jax.ShapeDtypeStruct((p,) + inputs[i + 1].shape[1:], inputs[i + 1].dtype)
                for q in c.buckets:
                    if q <= p:
                        idx = jax.ShapeDtypeStruct((q,), jnp.int32)
                        todo[("take", _signature((x, idx)))] = (x, idx)
                # The queue of rows waiting for program i + 1: its buffer, appending rows
                # of a bucket of features to it, taking a bucket from it, shifting it.
                buf = jax.ShapeDtypeStruct((2 * c.max_batch,) + x.shape[1:], x.dtype)
                todo[("zeros", _signature(buf))] = buf
                idx, scalar = (jax.ShapeDtypeStruct((p,), jnp.int32),
                               jax.ShapeDtypeStruct((), jnp.int32))
                args = (buf, x, idx, scalar, scalar)
                todo[("put", _signature(args))] = args
                for q in c.buckets + (2 * c.max_batch,):
                    idx = jax.ShapeDtypeStruct((q,), jnp.int32)
                    todo[("take", _signature((buf, idx)))] = (buf, idx)
    todo = {k: x for k, x in todo.items() if k not in c.programs}
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        # Each program compiles (or is read from the cache) while the next is lowered.
        futures = {k: pool.submit(_compile, _lower(c, k[:-1], x)) for k, x in todo.items()}
        c.programs.update({k: f.result() for k, f in futures.items()})
    return len(futures)
