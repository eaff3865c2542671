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


@dataclasses.dataclass
class _Stream:
    """The state of one `serve` call: requests not yet answered, a queue per segment of
    the samples waiting for it, and device work dispatched but not read yet."""
    c: Cascade
    rule: str
    threshold: float
    max_wait_s: float
    requests: dict = dataclasses.field(default_factory=dict)
    queues: list = dataclasses.field(default_factory=list)   # [i]: waiting for segment i
    pending: list = dataclasses.field(default_factory=list)  # (segment, output, owners)
    next_out: int = 0
    variant: str = dataclasses.field(init=False)

    def __post_init__(self):
        self.queues = [DeviceQueue() for _ in range(self.c.model.num_exits)]
        self.variant = RULE_VARIANT[self.rule]

    def admit(self, r: int, x: np.ndarray) -> list:
        """Request r's images: its answers' room, and each chunk's first program
        dispatched (the device starts before the host reads the previous round)."""
        c, top = self.c, self.c.max_batch
        self.requests[r] = _Request(np.zeros((len(x), c.model.cfg.num_classes), np.float32),
                                    np.full(len(x), c.model.num_exits - 1, np.int32), len(x))
        chunks = [x[s:s + top] for s in range(0, len(x), top)]
        return [(branch(c, 0, self.variant, pad_rows(chunk, bucket_for(c, len(chunk)))),
                 [(r, j) for j in range(k * top, k * top + len(chunk))])
                for k, chunk in enumerate(chunks)]

    def finish(self, owners: list, logits: np.ndarray, exit_index: int) -> None:
        for (r, row), o in zip(owners, logits):
            req = self.requests[r]
            req.logits[row], req.exits[row] = o, exit_index
            req.waiting -= 1

    def route(self, i: int, out, owners: list) -> None:
        """Branch program i's output for `owners`: leavers answered, the rest queued, and a
        full bucket dispatched as soon as one has gathered."""
        c, n = self.c, len(owners)
        if i == c.model.num_exits - 1:
            self.finish(owners, np.asarray(out)[:n], i)
            return
        h, small = out
        o, leave, keep = routing.decide(small, n, c.model.cfg.num_classes, self.rule,
                                        self.threshold, OTHER)
        self.finish([w for w, x in zip(owners, leave) if x], o[leave], i)
        if len(keep) == 0:
            return
        q = self.queues[i + 1]
        q.push(c, h, keep, [owners[j] for j in keep])
        if q.count >= c.max_batch:
            x, taken = q.pop(c, c.max_batch)
            self.pending.append((i + 1, branch(c, i + 1, self.variant, x), taken))

    def settle(self) -> None:
        """Reads and routes everything dispatched so far."""
        while self.pending:
            self.route(*self.pending.pop(0))

    def launch(self, flush: bool) -> None:
        """Dispatches what waits, with `flush` or once past the wait bound."""
        for i in range(1, self.c.model.num_exits):
            q = self.queues[i]
            late = q.since is not None and time.perf_counter() - q.since >= self.max_wait_s
            if q.count and (flush or late):
                x, owners = q.pop(self.c)
                self.pending.append((i, branch(self.c, i, self.variant, x), owners))

    def done(self) -> Iterator[dict]:
        """The answers of the requests finished, in request order."""
        while self.next_out in self.requests and self.requests[self.next_out].waiting == 0:
            req = self.requests.pop(self.next_out)
            self.next_out += 1
            yield api.answer(self.c, {"logits": req.logits, "exit": req.exits,
                                      "flops": path_flops(self.c, self.rule)[req.exits]})


def serve(c: Cascade, batches: Iterable, rule: str | None = None,
          threshold: float | None = None, max_wait_s: float = 0.05) -> Iterator[dict]:
    """Routes a stream of batches with continuous batching of the deep segments. Yields,
    per incoming batch and in their order, what `api.predict` returns for it. A sample
    waits for a full bucket at most about `max_wait_s` (checked as each batch arrives; the
    stream's end runs whatever waits). Device work is dispatched a round ahead: a batch's
    first segment is queued on the device before the host reads the deep results of the
    previous round, so the device is not idle while the host routes."""
    rule, threshold = api.resolve_point(c, rule, threshold)
    if rule == "oracle":
        raise ValueError("the oracle needs labels: it is a bound, not a router")
    if c.recheck is not None:
        raise ValueError("throughput mode does not rerun close calls: serve a "
                         "bfloat16_checked cascade with api.predict")
    if not (isinstance(max_wait_s, (int, float)) and not isinstance(max_wait_s, bool)
            and max_wait_s >= 0):
        raise ValueError(f"max_wait_s must be a number of seconds >= 0; got {max_wait_s!r}")
    stream = _Stream(c, rule, threshold, max_wait_s)
    for r, images in enumerate(batches):
        firsts = stream.admit(r, api.check_images(images, c.model.cfg.image_size))
        stream.settle()
        for out, owners in firsts:
            stream.route(0, out, owners)
        stream.launch(flush=False)
        yield from stream.done()
    while stream.pending or any(q.count for q in stream.queues):
        stream.settle()
        stream.launch(flush=True)
    yield from stream.done()
