"""Seeds: nodes accept 0 .. 2**64 - 1 (ComfyUI's range), and so does torch's ``manual_seed``.

Code that derives further seeds (sample k of a batch uses ``seed + k``, a second noise
stream uses ``seed + 1``) goes through :func:`derive_seed`, which wraps modulo 2**64 so
that the largest seed a node accepts never overflows ``manual_seed``.  For every ordinary
seed the result is exactly ``seed + k``.

:func:`private_rng` builds networks from a seed without moving the process's random stream
(a node never changes what ComfyUI draws next); SinDDM and the rectifier use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SEED_MAX = 2**64 - 1


def derive_seed(seed: int, k: int = 0) -> int:
    """``seed + k`` wrapped into [0, 2**64): a valid ``torch.Generator.manual_seed`` argument.

    Negative seeds wrap the way torch itself reads them (-1 is 2**64 - 1).
    """
    return (int(seed) + int(k)) % (SEED_MAX + 1)


@contextmanager
def private_rng(seed: int = 0) -> Iterator[None]:
    """Run a block on a private copy of torch's CPU random stream, seeded ``seed``.

    Modules draw their initial weights from the process-wide CPU generator; inside this
    block that generator starts from the state ``torch.Generator().manual_seed(seed)``
    has, and its previous state is restored afterwards, so building a network here gives
    the weights a global ``manual_seed(seed)`` would give without changing what the rest
    of the process draws next (a node never moves ComfyUI's RNG).
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(torch.Generator().manual_seed(int(seed)).get_state())
        yield
