import pytest
import torch

from mambamim.layers.posembed import sincos_pos_embed_3d


@pytest.mark.parametrize("grid,dim", [((6, 6, 6), 384), ((2, 3, 5), 64), ((1, 4, 2), 10)])
def test_every_position_gets_its_own_embedding(grid, dim):
    emb = sincos_pos_embed_3d(grid, dim)
    assert emb.shape == (grid[0] * grid[1] * grid[2], dim)
    dist = torch.cdist(emb, emb)
    off_diag = dist + torch.eye(len(emb)) * 1e9
    assert off_diag.min() > 1e-3


def test_embedding_depends_on_position_not_grid_size():
    small = sincos_pos_embed_3d((2, 3, 4), 48).view(2, 3, 4, 48)
    large = sincos_pos_embed_3d((5, 6, 7), 48).view(5, 6, 7, 48)
    assert torch.allclose(small, large[:2, :3, :4])


def test_axes_are_not_interchangeable():
    emb = sincos_pos_embed_3d((3, 3, 3), 60).view(3, 3, 3, 60)
    assert not torch.allclose(emb[1, 0, 0], emb[0, 1, 0]) and not torch.allclose(emb[0, 1, 0], emb[0, 0, 1])
