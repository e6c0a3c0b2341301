import warnings

import pytest
import torch

# Third-party deprecation noise (timm registry, MobileSAM) is not ours to fix.
warnings.filterwarnings("ignore", category=UserWarning, module=r"(timm|mobile_sam)\b.*")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
