"""Run under ``python -m torch.distributed.run --nproc_per_node 2`` (gloo): rectifier training where rank 1's
slice of the first step's global batch holds an image full of NaN and rank 0's holds none of it.

Every rank prints one line, ``rank R: finished`` or ``rank R: <ExceptionType>: <message>``, and the script
exits 3 when training raised (used by tests/test_rectifier_core.py: every rank must stop at the same step,
naming the rank with the bad batch, and nothing may hang)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from test_engine import tiny_pixel_unet  # noqa: E402

from core.diffusion import alphas_cumprod  # noqa: E402
from core.pixel import DiffusersPixel  # noqa: E402
from core.rectifier import TrainConfig, new_rectifier, train_rectifier  # noqa: E402
from core.rectifier.distributed import setup, teardown  # noqa: E402
from core.rectifier.train import draw  # noqa: E402

N, BATCH, T = 6, 2, 1000


def nan_index(seed: int) -> int | None:
    """An image index in rank 1's slice of step 1 and not in rank 0's, or None."""
    idx0 = draw(1, seed, N, BATCH, (3, 16, 16), T, 0, 2)[0].tolist()
    idx1 = draw(1, seed, N, BATCH, (3, 16, 16), T, 1, 2)[0].tolist()
    only1 = [i for i in idx1 if i not in idx0]
    return only1[0] if only1 else None


def report(line: str) -> None:
    """One line to stdout in a single write: both ranks share the pipe, and ``print`` may write the text and its
    newline separately, so two ranks' lines could run together (seen in CI)."""
    os.write(1, (line + "\n").encode())


def main() -> int:
    torch.set_num_threads(1)
    rank, size, _ = setup(torch.device("cpu"))
    code = 0
    try:
        seed = next(s for s in range(100) if nan_index(s) is not None)
        model = DiffusersPixel(tiny_pixel_unet(), alphas_cumprod(torch.linspace(1e-4, 0.02, T, dtype=torch.float64)))
        x0 = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        x0[nan_index(seed)] = float("nan")
        r = new_rectifier(model.unet_parameters(), 3, encoder_layers=(1, 1, 1, 1), width=8)
        train_rectifier(model, r, x0, TrainConfig(steps=3, batch=BATCH, seed=seed))
        report(f"rank {rank}: finished")
    except Exception as e:  # noqa: BLE001  (reported to the test)
        report(f"rank {rank}: {type(e).__name__}: {e}")
        code = 3
    finally:
        # Both ranks report before either exits: the launcher stops the other workers as soon as one exits with an
        # error, which could otherwise cut off a rank that has not printed yet (seen once in CI).
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
