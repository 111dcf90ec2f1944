"""The decoding thread's queue: requests beyond --max-queue are refused at once (the API's 429)
instead of waiting unboundedly."""

from __future__ import annotations

import pytest
from serving_cases import MAX_TOKENS

from fedamole.serving.decoding import DecodeRow
from fedamole.serving.pool import RunPool
from fedamole.serving.scheduler import BatchScheduler, Pending, QueueFull
from fedamole.serving.settings import ServeSettings


def test_a_full_queue_refuses_at_once(runs):
    pool = RunPool(runs["fedit"], [0])
    scheduler = BatchScheduler(pool, ServeSettings(max_batch=1, max_queue=2))  # not started
    row = DecodeRow("client-0", [1, 2, 3], MAX_TOKENS)
    for _ in range(2):
        scheduler.submit(Pending(row, lambda _result: None))
    with pytest.raises(QueueFull):
        scheduler.submit(Pending(row, lambda _result: None))
