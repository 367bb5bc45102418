import os
from pathlib import Path

import pytest
import torch

# The real data beside the checkout (CI and developers: ../shared/data), unless the
# environment points elsewhere.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("SSL_SEC_DATA", str(SHARED))
# cuBLAS reads its workspace setting once, at its first call in the process: set it before any
# test touches CUDA, so that the deterministic-resume GPU test can enable deterministic mode.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# scripts/test.sh runs the suite in pytest-xdist workers, one per core: each worker computes on
# its share of the cores instead of all of them competing for every core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are always collected; without CUDA they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["SSL_SEC_DATA"])
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.fail(f"real CIFAR-10 not found under {root}; set SSL_SEC_DATA")
    return root


@pytest.fixture
def make_checkpoint(tmp_path):
    """Write an untrained ssl_sec checkpoint (same format as `engine.train`) and return its path.

    A tiny config (ResNet-18 with the ImageNet stem, small heads) keeps the evaluation tests
    fast; `overrides` are dotted config overrides.
    """
    from ssl_sec.checkpoint import FORMAT_VERSION, atomic_save
    from ssl_sec.config import to_dict
    from ssl_sec.engine import build_model
    from ssl_sec.recipe import from_dict

    def make(*overrides: str, name: str = "run", seed: int = 0) -> Path:
        cfg = from_dict({}, ["model.cifar_stem=false", "model.proj_hidden_dim=64",
                             "model.proj_output_dim=16", "data.train_subset=128",
                             "data.test_subset=64", "data.download=false", "device=cpu",
                             *overrides])
        torch.manual_seed(seed)
        model = build_model(cfg, torch.device("cpu"))
        path = tmp_path / name / "last.pt"
        atomic_save({"format": "ssl_sec", "format_version": FORMAT_VERSION,
                     "config": to_dict(cfg), "model": model.state_dict(), "epoch": 0,
                     "step": 0}, path, sealed=True)
        return path

    return make
