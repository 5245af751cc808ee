"""The device worker of the embedding server: a bounded queue and token-budget batches.

Request handlers tokenise their sentences and `submit` them; one worker thread forms
batches and runs them through `SentenceEncoder.dispatch`, one bucket shape at a time:

* the oldest queued sentence picks the bucket; the batch takes queued sentences of that
  bucket, oldest first, then shorter ones, up to the bucket's token budget
  (`encoder.batch_rows`), and waits at most `max_wait_ms` from the oldest arrival to fill;
* batch i+1 is dispatched before batch i is copied out, so the device stays busy;
* each row of a batch is computed independently (masked attention, masked mean), so a
  sentence's embedding does not depend on which requests shared its batch;
* an exception in a batch fails only the requests with a sentence in it, and the worker
  carries on; a cancelled request (client gone) is skipped, never poisons its batch.

The queue is bounded in sentences: `submit` raises `QueueFull` rather than grow it.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from mst5_jax.inference.encoder import SentenceEncoder, batch_rows, bucket_lengths, bucket_of, row_options

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` sentences already; retry later."""


class Job:
    """One request's sentences: filled row by row by the worker; `on_done` fires once."""

    def __init__(self, ids: Sequence[Sequence[int]], dim: int, on_done: Callable[["Job"], None]):
        self.ids = ids
        self.out = np.zeros((len(ids), dim), np.float32)
        self.remaining = len(ids)
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.on_done = on_done
        self.enqueued = time.monotonic()

    def _finish(self) -> None:
        try:
            self.on_done(self)
        except Exception:  # a callback must not take the worker down
            log.exception("batcher: result callback failed")


@dataclasses.dataclass
class _Item:
    job: Job
    row: int
    length: int
    bucket: int


class Batcher:
    """Collects tokenised sentences from many requests into bucket-shaped batches.

    Args:
      encoder: the `SentenceEncoder` (its bucket shapes should be warm: `encoder.warmup`).
      max_length: tokens per sentence including EOS (ids must already be cut to it).
      max_batch_tokens: the token budget of one batch (rows x bucket length).
      max_wait_ms: how long the oldest queued sentence waits for its batch to fill.
      max_queue: the most sentences queued at once.
      on_batch: called with (sentences, rows, length, seconds) after each batch (metrics).
    """

    def __init__(self, encoder: SentenceEncoder, *, max_length: int, max_batch_tokens: int,
                 max_wait_ms: float, max_queue: int,
                 on_batch: Optional[Callable[[int, int, int, float], None]] = None):
        self.encoder = encoder
        self.buckets = bucket_lengths(max_length)
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[_Item] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mst5-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finishes what is queued, then ends the worker thread."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Sentences waiting in the queue."""
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queues every sentence of `job`; raises `QueueFull` (queuing nothing) if they don't fit."""
        items = [_Item(job, r, len(x), bucket_of(len(x), self.buckets)) for r, x in enumerate(job.ids)]
        with self._cv:
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} sentences queued, max_queue={self.max_queue}")
            self._queue.extend(items)
            self._cv.notify_all()

    # ------------------------------------------------------------------ worker
    def _rows(self, bucket: int) -> list[int]:
        ndev = self.encoder.num_devices
        return row_options(batch_rows(bucket, self.max_batch_tokens, ndev), ndev)

    def _take(self, block: bool) -> Optional[tuple[list[_Item], int, int]]:
        """The next batch (items, rows, length), or None (nothing ready / stopping and empty)."""
        with self._cv:
            while True:
                while self._queue and self._queue[0].job.cancelled:
                    self._queue.popleft()
                if not self._queue:
                    if self._stop or not block:
                        return None
                    self._cv.wait()
                    continue
                head = self._queue[0]
                full = self._rows(head.bucket)[0]
                fits = sum(1 for it in self._queue if it.bucket <= head.bucket)
                deadline = head.job.enqueued + self.max_wait
                now = time.monotonic()
                if fits >= full or now >= deadline or self._stop:
                    break
                if not block:
                    return None
                self._cv.wait(deadline - now)
            same = [it for it in self._queue if it.bucket == head.bucket and not it.job.cancelled]
            shorter = [it for it in self._queue if it.bucket < head.bucket and not it.job.cancelled]
            chosen = (same + shorter)[:full]
            taken = {id(it) for it in chosen}
            self._queue = collections.deque(it for it in self._queue if id(it) not in taken)
        rows = next(r for r in reversed(self._rows(head.bucket)) if r >= len(chosen))
        return chosen, rows, head.bucket

    def _run(self) -> None:
        in_flight = None
        while True:
            batch = self._take(block=in_flight is None)
            if batch is not None:
                items, rows, length = batch
                started = time.monotonic()
                try:
                    result = self.encoder.dispatch([it.job.ids[it.row] for it in items], rows, length)
                except Exception as e:  # noqa: BLE001 (fail these requests, keep serving)
                    self._fail(items, e)
                else:
                    if in_flight is not None:
                        self._deliver(*in_flight)
                    in_flight = (items, result, rows, length, started)
                    continue
            if in_flight is not None:
                self._deliver(*in_flight)
                in_flight = None
                continue
            if batch is None:
                with self._cv:
                    if self._stop and not self._queue:
                        return

    def _deliver(self, items: list[_Item], result, rows: int, length: int, started: float) -> None:
        try:
            emb = np.asarray(result)
        except Exception as e:  # noqa: BLE001
            self._fail(items, e)
            return
        if self.on_batch is not None:
            self.on_batch(len(items), rows, length, time.monotonic() - started)
        for r, it in enumerate(items):
            job = it.job
            job.out[it.row] = emb[r]
            job.remaining -= 1
            if job.remaining == 0 and job.error is None:
                job._finish()

    def _fail(self, items: list[_Item], error: BaseException) -> None:
        log.error("batcher: a batch of %d sentences failed: %r", len(items), error)
        for job in {id(it.job): it.job for it in items}.values():
            if job.error is None:
                job.error = error
                job.cancelled = True  # its other sentences need not run
                job._finish()
