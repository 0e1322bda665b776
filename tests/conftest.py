import os
from pathlib import Path

import pytest
import torch

# Keep the suite predictable on small CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_abdomen_3mm"


@pytest.fixture
def real_ct_dir() -> Path:
    """The real abdomen CT shipped beside the repository on developer and CI machines; skip elsewhere."""
    if not (SHARED_DATA / "image.nii.gz").exists():
        pytest.skip("real CT sample (../shared/data/ct_abdomen_3mm) not present")
    return SHARED_DATA
