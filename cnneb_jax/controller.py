"""The host-side early-exit controller: real exits in batch mode.

For a batch, one compiled program per branch point runs the segment, its exit and the
rule's expert (`model.branch_fn`) and hands the host one small array of logits; the host
scores every sample with the chosen rule and decides which leave. Only the samples routed
onward are gathered (on the device) and run through the next program; answers are
scattered back in input order. Sub-batches are padded to a few fixed bucket sizes; in a
batch of several chunks the rows that go on wait on the device until they fill the largest
bucket. `warm_up` compiles every program routing can reach, so nothing compiles afterwards.

Rules (score = how sure we are that the sample may leave; it leaves when score > threshold):
  expert       softmax(E_i)[Other], the proposed expert (concat with O_i's output)
  aux5b        softmax(E_i')[Other], the "Auxiliary+5b" expert
  max_softmax  max softmax(O_i), "Auxiliary as Expert"
  entropy      1 - H(softmax(O_i)) / log(C), BranchyNet's entropy rule, scaled to [0, 1]
  oracle       needs labels: FT samples score in [0, 0.5), the rest in [0.5, 1) (random
               order inside each group), so threshold 0.5 sends exactly the FT samples deep.
               It runs every exit on every sample to know FT: for the upper bound only.
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

from cnneb_jax import onednn
from cnneb_jax.compile_cache import memo, memo_json
from cnneb_jax.heads import OTHER
from cnneb_jax.metrics import ft_labels, segment_flops
from cnneb_jax.model import Model, Variables, branch_fn, inference_variables, segment_fns

RULES = ("expert", "aux5b", "max_softmax", "entropy", "oracle")


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


def _exported(c: Cascade, i: int, variant: str, x) -> jax.export.Exported:
    """Branch program (i, variant) traced once for any batch size (a symbolic batch axis):
    lowering it for each bucket then costs a fraction of tracing the Flax model again."""
    key = ("export", i, variant, _signature(x)[0][1:], _signature(x)[1])
    exp = c.programs.get(key)
    if exp is None:
        batch, = jax.export.symbolic_shape("b")
        spec = jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), x.dtype)
        fn = jax.jit(branch_fn(c.model, i, variant))
        specs = jax.tree_util.tree_map(_spec, _branch_variables(c, i, variant))
        # Traced once per config on this machine (memoised with the compilation cache),
        # and per kernel library: with oneDNN's the program calls them (FFI custom calls,
        # registered by onednn.use before they are compiled).
        kernels = "onednn" if onednn.use(c.model.cfg.onednn, jnp.float32) else "xla"
        memo_key = json.dumps([dataclasses.asdict(c.model.cfg), key[1:4], str(key[4]),
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
    # docs/RESULTS.md section 10): convolutions and matmuls are library calls either way.
    if jax.default_backend() == "cpu":
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


def bucket_for(c: Cascade, n: int) -> int:
    return next(b for b in c.buckets if b >= n)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def softmax_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def rule_score(rule: str, o_logits: np.ndarray, e_logits: np.ndarray | None) -> np.ndarray:
    """Leave-score in [0, 1] for the non-oracle rules (see module docstring)."""
    if rule in ("expert", "aux5b"):
        return softmax_np(e_logits)[:, OTHER]
    p = softmax_np(o_logits)
    if rule == "max_softmax":
        return p.max(-1)
    if rule == "entropy":
        h = -np.sum(p * np.log(np.clip(p, 1e-12, None)), -1)
        return 1.0 - h / np.log(p.shape[-1])
    raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")


def oracle_scores(exit_preds: list[np.ndarray], labels: np.ndarray, i: int,
                  seed: int = 0) -> np.ndarray:
    u = np.random.default_rng([seed, i]).random(len(labels))
    ft = ft_labels(exit_preds, labels, i).astype(bool)
    return np.where(ft, 0.5 * u, 0.5 + 0.5 * u)


def step_flops(c: Cascade, rule: str) -> tuple[list[float], list[float], list[float]]:
    """FLOPs per image of each segment, each exit, and the rule at each branch point (0 at
    the last exit and for rules computed from O_i alone)."""
    segs = [f for k, f in c.flops.items() if k.startswith("seg:")]
    heads = [f for k, f in c.flops.items() if k.startswith("head:")]
    rule_cost = [{"expert": c.flops.get(f"expert:E{i + 1}", 0.0),
                  "aux5b": c.flops.get(f"aux5b:E{i + 1}", 0.0)}.get(rule, 0.0)
                 for i in range(len(segs) - 1)] + [0.0]
    return segs, heads, rule_cost


def path_flops(c: Cascade, rule: str) -> np.ndarray:
    """FLOPs per image for leaving at exit 0..m-1 under `rule` (rule cost at each branch)."""
    segs, heads, rule_cost = step_flops(c, rule)
    m = len(segs)
    # Reaching exit i costs all segments and heads up to i, and the rule at every branch
    # point passed (0..i-1) plus the one at i (evaluated before deciding to leave).
    return np.cumsum([segs[i] + heads[i] + rule_cost[i] for i in range(m)])


def last_exit_flops(c: Cascade) -> float:
    """FLOPs per image of the plain network: every segment and the last exit, no branches."""
    segs = sum(f for k, f in c.flops.items() if k.startswith("seg:"))
    return segs + c.flops[f"head:O{c.model.num_exits}"]


def first_exit_flops(c: Cascade) -> float:
    """FLOPs per image of the first segment and O1 alone."""
    first = next(k for k in c.flops if k.startswith("seg:"))
    return c.flops[first] + c.flops["head:O1"]


def run_cascade(c: Cascade, images: np.ndarray, rule: str, threshold: float,
                labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Routes a batch (uint8, or float in [0, 255], NHWC). Returns per sample: `logits` of
    the exit taken, `exit` (0-based), `flops` of its path; and `rows_run`, the rows each
    branch program really ran, bucket padding included.

    A batch larger than the biggest bucket runs in chunks, the next chunk's first program
    dispatched before the host routes the current one, so the device is not idle while the
    host decides. The rows that go on wait on the device, a queue per segment, until a
    full bucket has gathered: the deep segments run in full buckets across chunks instead
    of each chunk's few deep rows padded to a bucket (only the last, partial bucket pads).
    With nothing waiting, the last rows to reach a segment run at once, as they are."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    x = pixels(images)
    oracle = _oracle_all(c, x, labels) if rule == "oracle" else None
    m, k, top = c.model.num_exits, c.model.cfg.num_classes, c.max_batch
    variant, n = RULE_VARIANT[rule], len(x)
    logits = np.zeros((n, k), np.float32)
    exits = np.full(n, m - 1, np.int32)
    rows_run = np.zeros(m, np.int64)
    queues = [_Waiting() for _ in range(m)]   # queues[i]: rows waiting for program i >= 1
    last = []                                 # the last exit's outputs, read at the end

    def run(i: int, h, ids: np.ndarray, final: bool) -> None:
        rows_run[i] += h.shape[0]
        decide(i, branch(c, i, variant, h), ids, final)

    def decide(i: int, out, ids: np.ndarray, final: bool) -> None:
        """Program i's output for samples `ids`: those that leave are answered, the rest
        go on. `final`: no more samples will reach program i + 1 from program i."""
        if i == m - 1:
            last.append((out, ids))
            return
        h, small = out
        small = np.asarray(small)[:len(ids)]   # the one host read per branch point
        o, e = small[:, :k], small[:, k:]
        score = oracle[i][ids] if oracle is not None else rule_score(rule, o, e)
        leave = score > threshold
        logits[ids[leave]] = o[leave]
        exits[ids[leave]] = i
        keep = np.nonzero(~leave)[0]
        q = queues[i + 1]
        if len(keep) and q.count == 0 and (final or len(keep) == top):
            # Nothing waits, and these are a full bucket or the last to come: run them now.
            if len(keep) < len(ids):   # when nobody left, the rows are already in place
                h = gather(c, h, pad_rows(keep.astype(np.int32), bucket_for(c, len(keep))))
            run(i + 1, h, ids[keep], final)
            return
        while len(keep):
            part, keep = keep[:top - q.count], keep[top - q.count:]
            q.push(c, h, part, ids[part])
            if q.count == top:
                run(i + 1, *q.pop(c), final=False)

    starts = list(range(0, n, top))
    first = lambda s: pad_rows(x[s:s + top], bucket_for(c, len(x[s:s + top])))
    ahead = branch(c, 0, variant, first(0)) if n else None
    for j, s in enumerate(starts):
        current, final = ahead, j + 1 == len(starts)
        rows_run[0] += bucket_for(c, len(x[s:s + top]))
        if not final:
            ahead = branch(c, 0, variant, first(starts[j + 1]))
        decide(0, current, np.arange(s, min(s + top, n)), final)
    for i in range(1, m):   # what still waits, segment by segment
        if queues[i].count:
            run(i, *queues[i].pop(c), final=True)
    for out, ids in last:
        logits[ids] = np.asarray(out)[:len(ids)]
    return {"logits": logits, "exit": exits, "flops": path_flops(c, rule)[exits],
            "rows_run": rows_run}


@dataclasses.dataclass
class _Waiting:
    """Features of the rows waiting for one branch program: rows [0, count) of a device
    buffer of `max_batch` rows (reused, updated in place), and the sample of each row."""
    buf: jax.Array | None = None
    count: int = 0
    ids: list = dataclasses.field(default_factory=list)

    def push(self, c: Cascade, h: jax.Array, rows: np.ndarray, ids: np.ndarray) -> None:
        """Appends rows `rows` of device features `h` (at most the free room)."""
        if self.buf is None:
            spec = jax.ShapeDtypeStruct((c.max_batch,) + h.shape[1:], h.dtype)
            self.buf = _program(c, ("zeros",), spec)()
        idx = pad_rows(rows.astype(np.int32), h.shape[0])
        args = (self.buf, h, idx, np.int32(self.count), np.int32(len(rows)))
        self.buf = _program(c, ("put",), args)(*args)
        self.count += len(rows)
        self.ids.append(ids)

    def pop(self, c: Cascade) -> tuple[jax.Array, np.ndarray]:
        """Everything waiting, as a copy of the buffer's first bucket, and its samples."""
        n, ids = self.count, np.concatenate(self.ids)
        self.count, self.ids = 0, []
        return gather(c, self.buf, np.arange(bucket_for(c, n), dtype=np.int32)), ids


def run_plain(c: Cascade, images: np.ndarray, exit_index: int) -> np.ndarray:
    """Logits of the network without branches, up to one exit (segments 0..exit_index and
    that exit), through the same kind of fused programs as the cascade: the reference."""
    out = []
    for s in range(0, len(images), c.max_batch):
        chunk = pixels(images[s:s + c.max_batch])
        h = pad_rows(chunk, bucket_for(c, len(chunk)))
        for i in range(exit_index):
            h = branch(c, i, "seg", h)
        o = branch(c, exit_index, "plain", h)
        o = o if exit_index == c.model.num_exits - 1 else o[1]
        out.append(np.asarray(o)[:len(chunk)])
    return np.concatenate(out)


def _oracle_all(c: Cascade, images: np.ndarray, labels: np.ndarray | None) -> list[np.ndarray]:
    if labels is None:
        raise ValueError("the oracle rule needs labels (it is an upper bound, not a router)")
    preds = all_exit_predictions(c, images)
    return [oracle_scores(preds, np.asarray(labels), i) for i in range(len(preds) - 1)]


def all_exit_predictions(c: Cascade, images: np.ndarray) -> list[np.ndarray]:
    """Predicted class at every exit for every sample (runs the whole network)."""
    outs = all_outputs(c, images)
    return [o.argmax(-1) for o in outs["exits"]]


def all_outputs(c: Cascade, images: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Logits of every exit and expert for every sample, through the "all" branch programs
    (for sweeps, calibration, PR/ROC curves and the oracle)."""
    m, k = c.model.num_exits, c.model.cfg.num_classes
    acc: dict[str, list[list[np.ndarray]]] = {"exits": [[] for _ in range(m)],
                                              "experts": [[] for _ in range(m - 1)],
                                              "aux5b": [[] for _ in range(m - 1)]}
    for s in range(0, len(images), c.max_batch):
        chunk = pixels(images[s:s + c.max_batch])
        n = len(chunk)
        h = pad_rows(chunk, bucket_for(c, n))
        for i in range(m):
            out = branch(c, i, "all", h)
            if i == m - 1:
                acc["exits"][i].append(np.asarray(out)[:n])
                break
            h, small = out
            small = np.asarray(small)[:n]
            acc["exits"][i].append(small[:, :k])
            acc["experts"][i].append(small[:, k:k + 2])
            acc["aux5b"][i].append(small[:, k + 2:])
    return {key: [np.concatenate(parts) for parts in lists] for key, lists in acc.items()}


def pixels(images) -> np.ndarray:
    """uint8 stays uint8 (cast on the device); anything else becomes float32 in [0, 255]."""
    x = np.asarray(images)
    return x if x.dtype == np.uint8 else x.astype(np.float32)


ROUTED_RULES = ("expert", "aux5b", "max_softmax", "entropy")


def warm_up(c: Cascade, rules: tuple[str, ...] = ROUTED_RULES, workers: int | None = None) -> int:
    """Compiles, without running them, the programs `run_cascade` can reach for `rules`:
    every branch program at every bucket size, the cast of uint8 pixels, every gather
    routing can run (from a bucket to the same or a smaller one: the samples that go on are
    never more than those that came in) and the queue's programs. Lowering runs here in
    turn; compiling (or reading the persistent cache) in `workers` threads meanwhile.
    Returns the number of programs."""
    cfg, m = c.model.cfg, c.model.num_exits
    variants = sorted({RULE_VARIANT[r] for r in rules})
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
                # The queue of rows waiting for program i + 1: its buffer, and appending
                # rows of a bucket of features to it.
                buf = jax.ShapeDtypeStruct((c.max_batch,) + x.shape[1:], x.dtype)
                todo[("zeros", _signature(buf))] = buf
                idx, scalar = (jax.ShapeDtypeStruct((p,), jnp.int32),
                               jax.ShapeDtypeStruct((), jnp.int32))
                args = (buf, x, idx, scalar, scalar)
                todo[("put", _signature(args))] = args
    todo = {k: x for k, x in todo.items() if k not in c.programs}
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        # Each program compiles (or is read from the cache) while the next is lowered.
        futures = {k: pool.submit(_compile, _lower(c, k[:-1], x)) for k, x in todo.items()}
        c.programs.update({k: f.result() for k, f in futures.items()})
    return len(futures)
