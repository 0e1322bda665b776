"""Plain words for the start-of-run lines of the commands (precision, processes, windows).

``amp`` modes are the names of :func:`mambamim.engine.distributed.resolve_amp` ("bf16", "fp16",
"none"); the banner says what each means instead of repeating the option's value.
"""

from __future__ import annotations

from typing import Sequence

_PRECISION = {
    "none": "precision fp32 (no autocast)",
    "bf16": "precision bf16 autocast (mixed precision)",
    "fp16": "precision fp16 autocast (mixed precision, loss scaling)",
}


def precision_words(mode: str) -> str:
    """``"none"`` -> ``"precision fp32 (no autocast)"``, ``"bf16"`` -> ``"precision bf16 autocast
    (mixed precision)"``; an unknown mode is named as given."""
    return _PRECISION.get(str(mode).lower(), f"precision {mode}")


def processes_words(world_size: int, device: object = None) -> str:
    """``1`` -> ``"1 process"``, ``4, "cuda:0"`` -> ``"4 processes (one per GPU, data parallel)"``;
    with ``device`` on one process: ``"1 process on cpu"``."""
    n = int(world_size)
    if n < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if n == 1:
        return "1 process" + (f" on {device}" if device is not None else "")
    on_gpu = device is not None and str(device).startswith("cuda")
    return f"{n} processes ({'one per GPU, ' if on_gpu else ''}data parallel)"


def window_words(roi: Sequence[int], overlap: float) -> str:
    """``(96, 96, 96), 0.5`` -> ``"sliding window 96x96x96 voxels, 50% overlap"``."""
    return f"sliding window {'x'.join(str(int(r)) for r in roi)} voxels, {overlap * 100:g}% overlap"


def tta_words(tta: bool | str) -> str:
    """``"none"`` -> ``"no test-time flips"``, ``"axes"`` -> ``"test-time flips: 3 axes (4 passes)"``,
    ``"all"`` -> ``"test-time flips: all 7 combinations (8 passes)"``."""
    mode = ("all" if tta else "none") if isinstance(tta, bool) else str(tta)
    return {"none": "no test-time flips", "axes": "test-time flips: 3 axes (4 passes)",
            "all": "test-time flips: all 7 combinations (8 passes)"}.get(mode, f"test-time flips {mode}")
