"""Shape checks shared by the selective scan's PyTorch reference and its Triton kernel (so that the
kernel module does not import its dispatcher)."""

from __future__ import annotations

__all__ = ["check_scan_shapes"]


def check_scan_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError unless the selective-scan operands have the layouts of
    :func:`mambamim.ops.selective_scan.selective_scan` (u, delta, z: (batch, dim, L); A: (dim, state);
    B, C: (batch, state, L); D, delta_bias: (dim,))."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, length), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} must match u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, state), got {tuple(A.shape)}")
    state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, state, length):
            raise ValueError(f"selective_scan: {name} must be ({batch}, {state}, {length}), got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be ({dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} must match u {tuple(u.shape)}")
