"""The one thread that runs the model: requests wait in a bounded queue and are decoded in batches.

While a batch decodes, new requests queue; the next batch takes every waiting request (up to
``max_batch``), after at most ``window_s`` for the first ones to gather when the server was idle.
Rows of one batch share a sampling setting (:func:`~fedamole.serving.decoding.batches_by_sampling`);
rows for different clients decode together when the pool serves per row. A full queue refuses at
once (the API answers 429) rather than letting latency grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedamole.serving.decoding import DecodeResult, DecodeRow, batches_by_sampling
from fedamole.serving.pool import ModelPool

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The server has ``max_queue`` requests waiting: try again later."""


@dataclass
class Pending:
    row: DecodeRow
    done: Callable[[DecodeResult | BaseException], None]


class BatchScheduler:
    def __init__(
        self, pool: ModelPool, max_batch: int = 16, max_queue: int = 64, window_s: float = 0.01
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("--max-batch and --max-queue must be at least 1")
        self.pool, self.max_batch, self.window_s = pool, max_batch, window_s
        self.queue: queue.Queue[Pending | None] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="fedamole-decoder", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def submit(self, pending: Pending) -> None:
        try:
            self.queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are waiting") from None

    def _loop(self) -> None:
        while (first := self.queue.get()) is not None:
            batch = self._gather(first)
            if batch is None:
                return
            for members in batches_by_sampling([p.row for p in batch]):
                self._decode([batch[i] for i in members])

    def _gather(self, first: Pending) -> list[Pending] | None:
        """The first request and whatever else arrives within the window (None: stopping)."""
        batch, deadline = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                timeout = deadline - time.monotonic()
                item = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return None
            batch.append(item)
        return batch

    def _decode(self, group: list[Pending]) -> None:
        self.batches += 1
        started = time.perf_counter()
        try:
            results = self.pool.answer([p.row for p in group])
        except Exception as exc:  # answered to every request of the batch, never a dead thread
            log.exception("decoding a batch of %d failed", len(group))
            for pending in group:
                pending.done(exc)
            return
        log.debug("batch of %d in %.3f s", len(group), time.perf_counter() - started)
        for pending, result in zip(group, results, strict=True):
            pending.done(result)
