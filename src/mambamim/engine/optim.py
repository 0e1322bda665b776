"""The optimiser every training run uses: AdamW with weight decay only where it belongs."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["build_optimizer"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on the conv / linear weights and none on the parameters that must
    not be pulled towards 0.

    A trainable parameter gets no decay when (the first rule that applies names it in the log):

    1. it carries ``param._no_weight_decay = True`` (the Mamba mixer's A_log, D, A_b_log, D_b:
       decaying A_log drifts the state decay rates towards A = -1);
    2. a module's ``no_weight_decay()`` method returns its name (timm convention, names relative to
       that module, dotted names allowed);
    3. a module's ``_no_weight_decay`` attribute lists its name (same; ``True``: all of the
       module's own parameters);
    4. it is 0/1-d (norm weights, biases, 1-d tokens), is a bias, or is a token (``*token``,
       ``*tokens.N``) of any shape.

    Frozen parameters (``requires_grad`` False, e.g. fixed positional embeddings) are left out.
    """
    listed = _listed_no_decay(model)
    decay, no_decay = [], []
    reasons: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        reason = _no_decay_reason(name, param, listed)
        if reason is None:
            decay.append(param)
        else:
            no_decay.append(param)
            reasons[reason] = reasons.get(reason, 0) + 1
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    logger.info("AdamW: weight decay %g on %d tensors (%d values), none on %d tensors (%d values; %s)",
                weight_decay, len(decay), sum(p.numel() for p in decay), len(no_decay),
                sum(p.numel() for p in no_decay), ", ".join(f"{n} {r}" for r, n in reasons.items()) or "-")
    # On CUDA the fused kernel: one pass over the parameters and their states per step (the step benchmarks
    # use it too); elsewhere PyTorch's default implementation.
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


def _listed_no_decay(model: nn.Module) -> set[int]:
    """ids of the parameters that some module of ``model`` lists as no-decay (rules 2 and 3 of
    :func:`build_optimizer`). By identity, so shared parameters and modules need no name bookkeeping."""
    ids: set[int] = set()
    for prefix, module in model.named_modules():
        # looked up on the class: a submodule called "no_weight_decay" is callable too, and would run forward
        method = getattr(type(module), "no_weight_decay", None)
        names = list(method(module)) if callable(method) else []
        attr = getattr(module, "_no_weight_decay", None)
        if attr is True:
            names += [n for n, _ in module.named_parameters(recurse=False)]
        elif isinstance(attr, str):
            names.append(attr)
        elif attr:
            names += list(attr)
        for name in names:
            try:
                ids.add(id(module.get_parameter(name)))
            except AttributeError:  # timm lists may name buffers or absent parameters
                logger.debug("no-weight-decay name %r is not a parameter of %s", name, prefix or "the model")
    return ids


def _no_decay_reason(name: str, param: nn.Parameter, listed: set[int]) -> str | None:
    """Why ``param`` (called ``name`` in the model) gets no weight decay; None: it gets decay."""
    if getattr(param, "_no_weight_decay", False):
        return "marked"
    if id(param) in listed:
        return "listed"
    parts = name.split(".")
    if param.ndim <= 1 or parts[-1] == "bias":
        return "0/1-d or bias"
    owner = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]  # ParameterList entries
    if owner.endswith(("token", "tokens")):
        return "token"
    return None
