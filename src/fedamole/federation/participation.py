"""Who takes part in each round: everybody (the paper's protocol) or a seeded sample.

The sample of a round depends only on the run seed and the round index, so every transport, a
resumed run and the feasibility check before round 0 all see the same clients.
"""

from __future__ import annotations

import numpy as np

from fedamole.config import Config

_SAMPLING_STREAM = 0x5A3D  # keeps this stream apart from the other users of the run seed


def participants(cfg: Config, round_idx: int) -> list[int]:
    """Sorted client ids taking part in ``round_idx``."""
    total, count = cfg.federation.num_clients, cfg.federation.participants_per_round
    if count >= total:
        return list(range(total))
    rng = np.random.default_rng([cfg.seed, round_idx, _SAMPLING_STREAM])
    return sorted(int(c) for c in rng.choice(total, size=count, replace=False))
