"""torch.compile with a way out: a compiled forward that falls back to eager when compiling fails."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["CompiledOrEager", "kept_tensors_backend"]


def _summary(exc: BaseException) -> str:
    """``Type: first line`` of an exception and of the error a backend failure wraps (its own first line is
    only "backend='inductor' raised:")."""
    parts = []
    for e in (exc, getattr(exc, "inner_exception", None) or exc.__cause__):
        if e is not None:
            line = next((ln for ln in str(e).splitlines() if ln.strip()), "")
            parts.append(f"{type(e).__name__}: {line}" if line else type(e).__name__)
    return "; ".join(parts)


class CompiledOrEager:
    """torch.compile'd forward that falls back to eager (with a warning) if compiling fails: at the first call,
    or at a recompile for a new input shape (the smaller last batch of an epoch, the last batch of
    sliding windows) hours into a run. A real error in the model fails the eager call too and propagates
    from there.

    Args:
        model: the module to run.
        what: what the warning says continues without compiling.
        memory_budget: below 1, compiled graphs keep at most about this fraction of the activations they
            would save for the backward pass, recomputing cheap (elementwise) ops in the backward instead
            (``torch._functorch.config.activation_memory_budget``, set only while this forward compiles).
        cuda_graphs: compile with mode "reduce-overhead" (CUDA graphs on CUDA devices) and mark a new
            step at every call; each call's outputs are valid until the next call.
    """

    def __init__(self, model: nn.Module, what: str = "training", memory_budget: float = 1.0,
                 cuda_graphs: bool = False) -> None:  # fmt: skip
        if not 0 < memory_budget <= 1:
            raise ValueError(f"memory_budget must be in (0, 1], got {memory_budget}")
        if memory_budget < 1 and not hasattr(torch._functorch.config, "activation_memory_budget"):
            logger.warning("this PyTorch (%s) has no activation memory budget; memory_budget %.2f is ignored",
                           torch.__version__, memory_budget)  # fmt: skip
            memory_budget = 1.0
        self.model = model
        self.what = what
        self.memory_budget = float(memory_budget)
        self.cuda_graphs = bool(cuda_graphs)
        self.compiled = torch.compile(model, mode="reduce-overhead") if self.cuda_graphs else torch.compile(model)
        self.state: bool | None = None  # None: not tried yet; True: compiled works; False: eager

    def _budget(self) -> contextlib.AbstractContextManager:
        # Graphs are partitioned when they compile, inside a call (the first, or a recompile), so the
        # setting is scoped to the calls rather than set for the whole process.
        if self.memory_budget >= 1:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(activation_memory_budget=self.memory_budget)

    def __call__(self, x: torch.Tensor):
        if self.state is False:
            return self.model(x)
        try:
            if self.cuda_graphs:
                # One training step per call: the graphs' outputs from the previous step may be reused.
                torch.compiler.cudagraph_mark_step_begin()
            with self._budget():
                out = self.compiled(x)
        except Exception as exc:
            when = "recompiling for input shape " + str(tuple(x.shape)) if self.state else "compiling"
            logger.warning("torch.compile failed while %s (%s); %s continues without it", when, _summary(exc),
                           self.what)
            self.state = False
            return self.model(x)
        self.state = True
        return out


def kept_tensors_backend() -> tuple[Callable, list[tuple[int, str, tuple, torch.dtype]]]:
    """A torch.compile backend that records what compiled forward graphs keep for the backward pass, as
    Inductor would partition them (its decompositions, the min-cut partitioner, the activation memory
    budget in force), and runs them without Inductor's code generation, so it works on any device.

    Returns ``(backend, kept)``; every compiled forward appends ``(bytes, name, shape, dtype)`` per kept
    tensor to ``kept``. A diagnostic for memory (``benchmarks/saved_activations.py --compiled``).
    """
    import torch._inductor.lowering  # noqa: F401  (Inductor's decompositions look it up)
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    kept: list[tuple[int, str, tuple, torch.dtype]] = []

    def fw_compiler(gm, example_inputs):
        for node in gm.graph.find_nodes(op="output")[0].args[0]:
            v = getattr(node, "meta", {}).get("val")
            if isinstance(v, torch.Tensor):
                kept.append((v.numel() * v.element_size(), node.name, tuple(v.shape), v.dtype))
        return gm.forward

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler, bw_compiler=lambda g, _: g.forward,
                                     partition_fn=min_cut_rematerialization_partition,
                                     decompositions=select_decomp_table())  # fmt: skip

    return backend, kept
