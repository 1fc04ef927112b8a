"""Seeded initialisation for library code that only draws from torch's global RNG.

Hugging Face `_init_weights`, `nn.Linear` and PEFT's LoRA init take no generator. Rather than
seeding the process (which changes every later random draw of the caller), they run inside
`seeded(seed)`: a fork of the CPU RNG, seeded, and restored on exit, so the same seed gives the
same weights and the caller's RNG stream is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block torch's CPU RNG starts from `seed`; on exit it is back to the caller's state.

    Only the CPU generator is forked: build models on the CPU, move them afterwards. Like any use of
    the global RNG this is not safe against another thread drawing random numbers at the same time.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
