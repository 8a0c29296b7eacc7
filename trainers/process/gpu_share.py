"""A trainer's share of its GPU when several trainer processes are pinned to one card.

The sweep's executor starts execution.trials_per_gpu slots per GPU and sets GPU_SHARE_ENV=N in each: the
trainer then sizes what it keeps on the card from a 1/N share of it, not from the whole card's free
memory (which the first of N processes would otherwise take for itself), and caps its allocator there.
"""
from __future__ import annotations

import os

from trainers.errors import UserError

GPU_SHARE_ENV = "FER_GPU_SHARE"

# A slot's allocator may hold this much of its 1/N of the card: the rest is for the N processes' CUDA contexts
# (~0.5 GB each, outside the allocator), so N full slots still fit: 4 slots on an H200 (141 GB) cap at 33.5 GB.
SHARE_HEADROOM = 0.95

# The resident training set (trainers.train.resident_images) takes at most this fraction of the memory a
# trainer may use, leaving the rest to the model, its optimizer state and activations.
RESIDENT_FRACTION = 4


def gpu_share() -> int:
    """How many trainer processes share this process's GPU (GPU_SHARE_ENV; 1 when unset)."""
    text = os.environ.get(GPU_SHARE_ENV, "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{GPU_SHARE_ENV}={text!r}: set it to the number of trainers sharing the GPU (a whole "
                        "number >= 1; execution.trials_per_gpu sets it), or unset it")
    return int(text)


def resident_budget(free: int, total: int, share: int) -> int:
    """Bytes the resident set may take: a quarter of the card's free memory, and of this process's share."""
    return min(free, total // share) // RESIDENT_FRACTION


def memory_fraction(share: int) -> float | None:
    """The cap on this process's allocator, as a fraction of the card; None (no cap) for a card of its own."""
    return None if share == 1 else SHARE_HEADROOM / share


def share_gpu(device) -> None:
    """Cap this process's CUDA allocator at its share of the card: one trial that outgrows its share fails
    with out of memory (and is retried) instead of starving the others on the card."""
    if device.type != "cuda":
        return
    fraction = memory_fraction(gpu_share())
    if fraction is not None:
        import torch
        torch.cuda.set_per_process_memory_fraction(fraction, device.index)     # None: the current device
