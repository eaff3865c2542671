"""Throughput mode: continuous batching of the deep segments across incoming batches.

The per-batch controller runs the samples of one batch that go deep at the bucket size of
their count: with a batch of 64 and a third going on, the deep segment runs on 24 padded
to 32. Here the features of the samples that go on wait on the device, in a queue per
segment, until a full bucket (`max_batch`) of them has gathered or the oldest has waited
`max_wait_s`; then the segment runs on all of them at once. Answers come back one per
incoming batch, in request order, each as soon as all of its samples are done.

    from cnneb_jax import api, throughput
    cascade = api.load("runs/cifar")
    for out in throughput.serve(cascade, batches, max_wait_s=0.05):   # an iterable of arrays
        out["labels"], out["exit"], ...

A sample's answer is the one `api.predict` gives (same programs, same rule, same
threshold): only when the deep segments run, and on how many samples, changes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator

import numpy as np

from cnneb_jax import api, routing
from cnneb_jax.controller import DeviceQueue, pad_rows, path_flops
from cnneb_jax.programs import RULE_VARIANT, Cascade, branch, bucket_for
from cnneb_jax.heads import OTHER


@dataclasses.dataclass
class _Request:
    logits: np.ndarray
    exits: np.ndarray
    waiting: int          # samples not answered yet


def serve(c: Cascade, batches: Iterable, rule: str | None = None,
          threshold: float | None = None, max_wait_s: float = 0.05) -> Iterator[dict]:
    """Routes a stream of batches with continuous batching of the deep segments. Yields,
    per incoming batch and in their order, what `api.predict` returns for it. A sample
    waits for a full bucket at most about `max_wait_s` (checked as each batch arrives; the
    stream's end runs whatever waits). Device work is dispatched a round ahead: a batch's
    first segment is queued on the device before the host reads the deep results of the
    previous round, so the device is not idle while the host routes. (Long, on purpose:
    the closures share the stream's requests, queues and pending work.)"""
    rule, threshold = api.resolve_point(c, rule, threshold)
    if rule == "oracle":
        raise ValueError("the oracle needs labels: it is a bound, not a router")
    if not (isinstance(max_wait_s, (int, float)) and not isinstance(max_wait_s, bool)
            and max_wait_s >= 0):
        raise ValueError(f"max_wait_s must be a number of seconds >= 0; got {max_wait_s!r}")
    m, k, top = c.model.num_exits, c.model.cfg.num_classes, c.max_batch
    variant = RULE_VARIANT[rule]
    queues = [DeviceQueue() for _ in range(m)]   # queues[i]: waiting for segment i (i >= 1)
    requests: dict[int, _Request] = {}
    pending: list = []                        # (segment, device output, owners), not read yet

    def finish(owners: list, logits: np.ndarray, exit_index: int) -> None:
        for (r, row), o in zip(owners, logits):
            req = requests[r]
            req.logits[row], req.exits[row] = o, exit_index
            req.waiting -= 1

    def route(i: int, out, owners: list) -> None:
        """Branch program i's output for `owners`: leavers answered, the rest queued."""
        n = len(owners)
        if i == m - 1:
            finish(owners, np.asarray(out)[:n], i)
            return
        h, small = out
        o, leave, keep = routing.decide(small, n, k, rule, threshold, OTHER)
        finish([w for w, x in zip(owners, leave) if x], o[leave], i)
        if len(keep) == 0:
            return
        q = queues[i + 1]
        q.push(c, h, keep, [owners[j] for j in keep])
        if q.count >= top:
            x, taken = q.pop(c, top)
            pending.append((i + 1, branch(c, i + 1, variant, x), taken))

    def settle() -> None:
        while pending:
            route(*pending.pop(0))

    def launch(flush: bool) -> None:
        """Dispatches what waits, with `flush` or once past the wait bound (full buckets
        are dispatched as they fill, in `route`)."""
        for i in range(1, m):
            q = queues[i]
            late = q.since is not None and time.perf_counter() - q.since >= max_wait_s
            if q.count and (flush or late):
                x, owners = q.pop(c)
                pending.append((i, branch(c, i, variant, x), owners))

    def done() -> Iterator[dict]:
        nonlocal next_out
        while next_out in requests and requests[next_out].waiting == 0:
            req = requests.pop(next_out)
            next_out += 1
            yield api.answer(c, {"logits": req.logits, "exit": req.exits,
                                 "flops": path_flops(c, rule)[req.exits]})

    next_out = 0
    for r, images in enumerate(batches):
        x = api.check_images(images, c.model.cfg.image_size)
        requests[r] = _Request(np.zeros((len(x), k), np.float32),
                               np.full(len(x), m - 1, np.int32), len(x))
        firsts = [(branch(c, 0, variant, pad_rows(x[s:s + top], bucket_for(c, len(x[s:s + top])))),
                   [(r, j) for j in range(s, min(s + top, len(x)))])
                  for s in range(0, len(x), top)]
        settle()
        for out, owners in firsts:
            route(0, out, owners)
        launch(flush=False)
        yield from done()
    while pending or any(q.count for q in queues):
        settle()
        launch(flush=True)
    yield from done()
