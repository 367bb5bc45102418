import os
from pathlib import Path

import pytest
import torch

# The real data beside the checkout (CI and developers: ../shared/data), unless the
# environment points elsewhere.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("SSL_SEC_DATA", str(SHARED))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def data_root() -> Path:
    root = Path(os.environ["SSL_SEC_DATA"])
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.fail(f"real CIFAR-10 not found under {root}; set SSL_SEC_DATA")
    return root
