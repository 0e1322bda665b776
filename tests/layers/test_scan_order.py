import itertools

import pytest
import torch

from mambamim.layers.scan_order import SCAN_ORDERS, ScanOrder, inverse_permutation, scan_permutation


def steps(perm, grid):
    d = perm // (grid[1] * grid[2])
    h = (perm // grid[2]) % grid[1]
    w = perm % grid[2]
    return d.diff().abs() + h.diff().abs() + w.diff().abs()


@pytest.mark.parametrize("order", SCAN_ORDERS)
@pytest.mark.parametrize("grid", [(6, 6, 6), (4, 6, 8), (3, 5, 7), (1, 1, 1), (2, 1, 9)])
def test_every_order_is_a_bijection_with_an_inverse(order, grid):
    perm = scan_permutation(order, grid)
    n = grid[0] * grid[1] * grid[2]
    assert sorted(perm.tolist()) == list(range(n))
    inv = inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))


@pytest.mark.parametrize("order", ["zigzag", "hilbert"])
@pytest.mark.parametrize("grid", [(6, 6, 6), (4, 6, 8), (8, 8, 8), (2, 4, 6), (6, 2, 10)])
def test_zigzag_and_hilbert_step_between_face_neighbours(order, grid):
    assert (steps(scan_permutation(order, grid), grid) == 1).all()


def test_zigzag_is_face_connected_on_odd_grids_too():
    for grid in itertools.product([1, 2, 3, 5], repeat=3):
        if grid[0] * grid[1] * grid[2] > 1:
            assert (steps(scan_permutation("zigzag", grid), grid) == 1).all(), grid


def test_hilbert_is_local_unlike_raster():
    # A Hilbert curve keeps runs of 8 consecutive tokens inside a small box; raster order does not.
    grid = (8, 8, 8)

    def mean_extent(perm):
        coords = torch.stack([perm // 64, (perm // 8) % 8, perm % 8], 1).view(-1, 8, 3)
        return (coords.amax(1) - coords.amin(1)).sum(1).float().mean()

    assert mean_extent(scan_permutation("hilbert", grid)) < 0.5 * mean_extent(scan_permutation("raster", grid))


def test_shuffle_is_fresh_in_training_and_fixed_in_eval():
    scan = ScanOrder("shuffle")
    scan.train()
    a, b = scan.permutation((4, 4, 4)), scan.permutation((4, 4, 4))
    assert not torch.equal(a, b)
    scan.eval()
    assert torch.equal(scan.permutation((4, 4, 4)), scan.permutation((4, 4, 4)))
    torch.manual_seed(1)
    scan.train()
    c = scan.permutation((4, 4, 4))
    torch.manual_seed(1)
    assert torch.equal(c, scan.permutation((4, 4, 4)))


@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_serialize_round_trip_and_order(order):
    x = torch.randn(2, 3, 4, 6, 8)
    scan = ScanOrder(order).eval()
    perm = scan.permutation((4, 6, 8))
    seq = ScanOrder.serialize(x, perm)
    assert seq.shape == (2, 4 * 6 * 8, 3)
    assert torch.equal(seq[:, 5], x.flatten(2)[:, :, perm[5]])
    assert torch.equal(ScanOrder.deserialize(seq, perm, (4, 6, 8)), x)


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="unknown scan order"):
        ScanOrder("spiral")


@pytest.mark.parametrize("order", ["hilbert", "shuffle"])
def test_serialize_gradients_are_gathers_equal_to_plain_indexing(order):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append((func.__name__, args[0].dim() if isinstance(args[0], torch.Tensor) else None))
            return func(*args, **(kwargs or {}))

    scan = ScanOrder(order).train()
    perm = scan.permutation((3, 4, 5))
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    seq = ScanOrder.serialize(x, perm)
    back = ScanOrder.deserialize(seq * torch.arange(1.0, 7.0, dtype=torch.float64), perm, (3, 4, 5))
    w = torch.randn_like(back)
    with Ops() as ops:
        (g,) = torch.autograd.grad((back * w).sum(), x)
    ref_seq = x.flatten(2).transpose(1, 2)[:, perm] * torch.arange(1.0, 7.0, dtype=torch.float64)
    ref = ref_seq[:, inverse_permutation(perm)].transpose(1, 2).reshape(x.shape)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    # no scatter into the activations: the only index_put is the one that inverts the 1-D permutation
    assert all(dim == 1 for name, dim in ops.names if name.startswith("index_put")), ops.names
    assert [name for name, dim in ops.names if name.startswith("index_select") and dim == 3], ops.names
    torch.autograd.gradcheck(lambda t: ScanOrder.serialize(t, perm), (x,))
