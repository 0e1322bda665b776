"""torch.compile with a way out: a compiled forward that falls back to eager when compiling fails."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["CompiledOrEager"]


class CompiledOrEager:
    """torch.compile'd forward that falls back to eager (with a warning) if compiling fails: at the first call,
    or at a recompile for a new input shape (the smaller last batch of an epoch, the last batch of
    sliding windows) hours into a run. A real error in the model fails the eager call too and propagates
    from there."""

    def __init__(self, model: nn.Module, what: str = "training") -> None:
        self.model = model
        self.what = what
        self.compiled = torch.compile(model)
        self.state: bool | None = None  # None: not tried yet; True: compiled works; False: eager

    def __call__(self, x: torch.Tensor):
        if self.state is False:
            return self.model(x)
        try:
            out = self.compiled(x)
        except Exception as exc:
            when = "recompiling for input shape " + str(tuple(x.shape)) if self.state else "compiling"
            logger.warning("torch.compile failed while %s (%s: %s); %s continues without it", when,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", self.what)  # fmt: skip
            self.state = False
            return self.model(x)
        self.state = True
        return out
