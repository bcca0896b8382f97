"""Seeds: nodes accept 0 .. 2**64 - 1 (ComfyUI's range), and so does torch's ``manual_seed``.

Code that derives further seeds (sample k of a batch uses ``seed + k``, a second noise
stream uses ``seed + 1``) goes through :func:`derive_seed`, which wraps modulo 2**64 so
that the largest seed a node accepts never overflows ``manual_seed``.  For every ordinary
seed the result is exactly ``seed + k``.
"""

from __future__ import annotations

SEED_MAX = 2**64 - 1


def derive_seed(seed: int, k: int = 0) -> int:
    """``seed + k`` wrapped into [0, 2**64): a valid ``torch.Generator.manual_seed`` argument.

    Negative seeds wrap the way torch itself reads them (-1 is 2**64 - 1).
    """
    return (int(seed) + int(k)) % (SEED_MAX + 1)
