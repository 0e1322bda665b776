import pytest
import torch

from mambamim.blocks.residual import ResidualBlock
from mambamim.masking import gather_blocks, scatter_blocks, stage_masks


def test_default_block_is_monai_unetr_basic_block_and_old_checkpoints_migrate():
    from monai.networks.blocks import UnetrBasicBlock

    from mambamim.engine.checkpoint import migrate_legacy_keys

    torch.manual_seed(0)
    monai_block = UnetrBasicBlock(3, 8, 8, kernel_size=3, stride=1, norm_name="instance", res_block=True).eval()
    assert set(monai_block.state_dict()) == {"layer.conv1.conv.weight", "layer.conv2.conv.weight"}
    ours = ResidualBlock(8, 8).eval()
    legacy = {f"skip_blocks.2.{k}": v for k, v in monai_block.state_dict().items()}
    migrated = migrate_legacy_keys(legacy)
    ours.load_state_dict({k.removeprefix("encoder.skip_blocks.2."): v for k, v in migrated.items()}, strict=True)
    x = torch.randn(2, 8, 8, 8, 8)
    torch.testing.assert_close(ours(x), monai_block(x))


@pytest.mark.parametrize("norm", ["instance", "layer", "batch"])
def test_cells_path_equals_the_masked_volume_path(norm):
    torch.manual_seed(0)
    block = ResidualBlock(4, 4, norm=norm, bias=True).double()
    visible = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    visible.view(2, -1)[0, [0, 3, 5]] = True
    visible.view(2, -1)[1, [1, 2, 7]] = True
    mask = stage_masks(visible, (16, 16, 16), 1, torch.float64)[0]
    x = torch.randn(2, 4, 16, 16, 16, dtype=torch.float64) * mask
    dense = block(x, mask)
    cells = block.forward_cells(gather_blocks(x, visible, 3), visible, 3)
    torch.testing.assert_close(scatter_blocks(cells, visible, 3), dense, rtol=1e-10, atol=1e-10)
    assert (dense * (1 - mask) == 0).all()  # re-masked: the next spatial op reads zeros there


def test_projection_when_widths_differ_and_bad_arguments():
    block = ResidualBlock(8, 4, norm="layer", bias=True)
    assert block.conv3 is not None and block(torch.randn(1, 8, 4, 4, 4)).shape == (1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        ResidualBlock(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="channels"):
        ResidualBlock(0, 4)
