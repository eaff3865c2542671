"""The host-side early-exit controller: real exits in batch mode.

For a batch, one compiled program per branch point runs the segment, its exit and the
rule's expert (`model.branch_fn`) and hands the host one small array of logits; the host
scores every sample with the chosen rule and decides which leave. Only the samples routed
onward are gathered (on the device) and run through the next program; answers are
scattered back in input order. Sub-batches are padded to a few fixed bucket sizes; in a
batch of several chunks the rows that go on wait on the device until they fill the largest
bucket. `programs.warm_up` compiles every program routing can reach, so nothing compiles
afterwards.

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
import time

import jax
import numpy as np

from cnneb_jax import routing
from cnneb_jax.heads import OTHER
from cnneb_jax.metrics import ft_labels
from cnneb_jax.programs import (RULE_VARIANT, Cascade, branch, bucket_for, gather, pixels, put,
                                zeros)
from cnneb_jax.recheck import close_calls
from cnneb_jax.routing import RULES, pad_rows


def rule_score(rule: str, o_logits: np.ndarray, e_logits: np.ndarray | None) -> np.ndarray:
    """Leave-score in [0, 1] for the non-oracle rules (see module docstring)."""
    return routing.score(rule, o_logits, e_logits, OTHER)


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
    the exit taken, `exit` (0-based), `flops` of its path, `rechecked` (rerun in float32:
    a bfloat16_checked cascade's close calls, recheck.py); and `rows_run`, the rows each
    branch program really ran, bucket padding included (not the reruns).

    A batch larger than the biggest bucket runs in chunks, the next chunk's first program
    dispatched before the host routes the current one, so the device is not idle while the
    host decides. The rows that go on wait on the device, a queue per segment, until a
    full bucket has gathered: the deep segments run in full buckets across chunks instead
    of each chunk's few deep rows padded to a bucket (only the last, partial bucket pads).
    With nothing waiting, the last rows to reach a segment run at once, as they are.
    (Long, on purpose: `run` and `decide` are closures over the batch's answers and queues,
    which passing around would only obscure.)"""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    x = pixels(images)
    oracle = _oracle_all(c, x, labels) if rule == "oracle" else None
    m, k, top = c.model.num_exits, c.model.cfg.num_classes, c.max_batch
    variant, n = RULE_VARIANT[rule], len(x)
    logits = np.zeros((n, k), np.float32)
    exits = np.full(n, m - 1, np.int32)
    rows_run = np.zeros(m, np.int64)
    queues = [DeviceQueue() for _ in range(m)]   # queues[i]: rows waiting for program i >= 1
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
        h, small = out   # small: the one host read per branch point
        o, leave, keep = routing.decide(small, len(ids), k, rule, threshold, OTHER,
                                        oracle[i][ids] if oracle is not None else None)
        logits[ids[leave]] = o[leave]
        exits[ids[leave]] = i
        q = queues[i + 1]
        if len(keep) and q.count == 0 and (final or len(keep) == top):
            # Nothing waits, and these are a full bucket or the last to come: run them now.
            if len(keep) < len(ids):   # when nobody left, the rows are already in place
                h = gather(c, h, pad_rows(keep.astype(np.int32), bucket_for(c, len(keep))))
            run(i + 1, h, ids[keep], final)
            return
        if len(keep):
            q.push(c, h, keep, ids[keep])
        if q.count >= top:
            x, owners = q.pop(c, top)
            run(i + 1, x, np.asarray(owners), final=False)

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
            x, owners = queues[i].pop(c)
            run(i, x, np.asarray(owners), final=True)
    for out, ids in last:
        logits[ids] = np.asarray(out)[:len(ids)]
    rechecked = np.zeros(n, bool)
    if c.recheck is not None:
        for i in range(m):
            rechecked |= _recheck(c, images, logits, i, among=exits == i)
    return {"logits": logits, "exit": exits, "flops": path_flops(c, rule)[exits],
            "rows_run": rows_run, "rechecked": rechecked}


def _recheck(c: Cascade, images: np.ndarray, logits: np.ndarray, exit_index: int,
             among: np.ndarray | None = None) -> np.ndarray:
    """bfloat16_checked (recheck.py): the close calls among `logits` of one exit (and among
    the rows `among` marks) replaced in place by float32's, from the reference cascade's
    plain path. Returns which rows were rerun."""
    again = close_calls(logits, c.recheck.margins[exit_index])
    if among is not None:
        again &= among
    rows = np.nonzero(again)[0]
    if len(rows):
        logits[rows] = run_plain(c.recheck.reference, np.asarray(images)[rows], exit_index)
    return again


@dataclasses.dataclass
class DeviceQueue:
    """Features of the rows waiting for one branch program, kept on the device: rows
    [0, count) of a buffer of twice the largest bucket (reused, updated in place), with
    whom each row answers to and when it arrived. Take a full bucket as soon as one has
    gathered: then fewer than a bucket wait, and a push of at most a bucket fits."""
    buf: jax.Array | None = None
    count: int = 0
    owners: list = dataclasses.field(default_factory=list)
    arrived: list = dataclasses.field(default_factory=list)

    @property
    def since(self) -> float | None:
        """When the oldest waiting row arrived."""
        return self.arrived[0] if self.arrived else None

    def push(self, c: Cascade, h: jax.Array, rows: np.ndarray, owners) -> None:
        """Appends rows `rows` of device features `h`, answering to `owners`."""
        if self.count + len(rows) > 2 * c.max_batch:
            raise ValueError("a queue holds two buckets: take a full one before pushing")
        if self.buf is None:
            self.buf = zeros(c, jax.ShapeDtypeStruct((2 * c.max_batch,) + h.shape[1:], h.dtype))
        self.buf = put(c, self.buf, h, rows, self.count)
        self.count += len(rows)
        self.owners += list(owners)
        self.arrived += [time.perf_counter()] * len(rows)

    def pop(self, c: Cascade, size: int | None = None) -> tuple[jax.Array, list]:
        """The first `size` waiting rows (default: all), as a device array of their bucket's
        rows, and their owners; the rest move to the front."""
        size = self.count if size is None else size
        x = gather(c, self.buf, np.arange(bucket_for(c, size), dtype=np.int32))
        owners, self.owners = self.owners[:size], self.owners[size:]
        self.arrived = self.arrived[size:]
        self.count -= size
        if self.count:
            self.buf = gather(c, self.buf, _shift_rows(c, size))
        return x, owners


def _shift_rows(c: Cascade, size: int) -> np.ndarray:
    """Row indices that move a queue's buffer up by `size` rows (what falls off the end is
    never read)."""
    rows = 2 * c.max_batch
    return np.minimum(np.arange(rows) + size, rows - 1).astype(np.int32)


def run_plain(c: Cascade, images: np.ndarray, exit_index: int) -> np.ndarray:
    """Logits of the network without branches, up to one exit (segments 0..exit_index and
    that exit), through the same kind of fused programs as the cascade: the reference.
    Every chunk is dispatched before any result is read, so chunks overlap as the
    cascade's do (a fair reference for its timing). A bfloat16_checked cascade reruns the
    close calls, as its routed answers do."""
    out = []
    for s in range(0, len(images), c.max_batch):
        chunk = pixels(images[s:s + c.max_batch])
        h = pad_rows(chunk, bucket_for(c, len(chunk)))
        for i in range(exit_index):
            h = branch(c, i, "seg", h)
        o = branch(c, exit_index, "plain", h)
        out.append((o if exit_index == c.model.num_exits - 1 else o[1], len(chunk)))
    logits = np.concatenate([np.asarray(o)[:n] for o, n in out])
    if c.recheck is not None:
        _recheck(c, images, logits, exit_index)
    return logits


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
    out = {key: [np.concatenate(parts) for parts in lists] for key, lists in acc.items()}
    if c.recheck is not None:   # each exit's close calls from float32 (the experts' stay)
        for i in range(m):
            _recheck(c, images, out["exits"][i], i)
    return out
