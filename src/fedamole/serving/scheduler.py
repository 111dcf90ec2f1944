"""The one thread that runs the model: requests wait in a bounded queue and are decoded in batches.

For pools that serve per row (FedAMoLE, single-LoRA baselines) the batch is continuous: waiting
requests join the running batch before its next decoding step (up to ``max_batch`` rows; a
request whose client would take the batch past ``--max-loaded`` clients waits, in order, until a
client's rows are done) and leave as soon as they are done (:class:`~fedamole.serving.continuous.ContinuousBatch`). For the
others, a batch takes every waiting request, decodes it to the end (rows grouped by sampling
setting, :func:`~fedamole.serving.decoding.batches_by_sampling`), then takes the next. An idle
server waits ``window_s`` for the first requests to gather. A full queue refuses at once (the API
answers 429) rather than letting latency grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedamole.serving.continuous import ContinuousBatch
from fedamole.serving.decoding import DecodeResult, DecodeRow, batches_by_sampling
from fedamole.serving.pool import ModelPool
from fedamole.serving.settings import ServeSettings

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The server has ``max_queue`` requests waiting: try again later."""


@dataclass
class Pending:
    row: DecodeRow
    done: Callable[[DecodeResult | BaseException], None]


class BatchScheduler:
    """Batches of up to ``settings.max_batch`` rows, ``settings.max_queue`` requests waiting."""

    def __init__(self, pool: ModelPool, settings: ServeSettings) -> None:
        if settings.max_batch < 1 or settings.max_queue < 1:
            raise ValueError("--max-batch and --max-queue must be at least 1")
        self.pool, self.max_batch = pool, settings.max_batch
        self.window_s = settings.batch_window_s
        self.queue: queue.Queue[Pending | None] = queue.Queue(maxsize=settings.max_queue)
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
        batch = self.pool.continuous_batch()
        if batch is None:
            self._loop_whole_batches()
        else:
            self._loop_continuous(batch)

    def _loop_whole_batches(self) -> None:
        while (first := self.queue.get()) is not None:
            batch = self._gather(first)
            if batch is None:
                return
            for members in batches_by_sampling([p.row for p in batch]):
                self._decode([batch[i] for i in members])

    def _loop_continuous(self, batch: ContinuousBatch) -> None:
        waiting: list[Pending] = []  # taken from the queue; their client cannot join yet
        while True:
            if batch.active or waiting:
                arrivals = self._drain(self.max_batch - batch.active - len(waiting))
            else:
                first = self.queue.get()
                arrivals = None if first is None else self._gather(first)
            if arrivals is None:
                error = RuntimeError("the server is shutting down")
                for pending in waiting:
                    pending.done(error)
                batch.fail(error)
                return
            candidates = waiting + arrivals
            fits = batch.takes([p.row for p in candidates])
            joining = [p for p, ok in zip(candidates, fits, strict=True) if ok]
            waiting = [p for p, ok in zip(candidates, fits, strict=True) if not ok]
            try:
                if joining:
                    self.batches += 1
                    batch.admit([(p.row, p.done) for p in joining])
                if batch.active:
                    batch.step()
            except Exception as exc:  # every joining request is answered, the thread lives on
                log.exception("decoding failed with %d rows running", batch.active)
                admitted = {id(slot.done) for slot in batch.slots}
                for pending in joining:
                    if id(pending.done) not in admitted:
                        pending.done(exc)
                batch.fail(exc)

    def _drain(self, room: int) -> list[Pending] | None:
        """Whatever is waiting now, up to ``room`` requests (None: stopping)."""
        arrivals: list[Pending] = []
        while len(arrivals) < room:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return None
            arrivals.append(item)
        return arrivals

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
