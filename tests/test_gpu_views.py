"""The recorded (CUDA-graph) views at every size and op set the recipes use, on a GPU.

The ImageNet-100 recipes once crashed at their first step: the recording of the 224-px view
failed with cudaErrorStreamCaptureInvalidated. Each suspect is a condition under which the
recording must now succeed and replay exactly what the op-by-op view computes:

- the ImageNet recipes' asymmetric views (blur 1.0 / 0.1, solarize 0 / 0.2, greyscale,
  jitter) at 224 px, batch 256 and 512, from the full photo or from the loader's crops;
- cuDNN autotuning on (as in training) for shapes it has not seen, and deterministic kernels;
- another thread making CUDA calls that are illegal during a global-mode capture (pinned
  host allocations, as the streaming DataLoader's pin-memory thread makes);
- a real streamed loader with workers and pinned memory delivering batches meanwhile.

Also here, the GPU half of tests/test_failures.py: a real CUDA error mid-epoch of a streamed
run ends the process within seconds, and a real CUDA out-of-memory is one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_failures import fail_a_streamed_run

from ssl_sec.augment import ViewAugment
from ssl_sec.engine import build_augment
from ssl_sec.recipe import load_recipe
from ssl_sec.runtime import backends

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _imagenet_views(crop: bool):
    cfg = load_recipe(ROOT / "recipes/imagenet100/simclr.yaml", ["data.classes_file=null"])
    views, _ = build_augment(cfg, CUDA, crop=crop)
    return views


def _images(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=CUDA,
                         generator=g)


@torch.no_grad()
def _assert_recorded_equals_op_by_op(views, images: torch.Tensor) -> None:
    """Two calls of the recorded views (fresh draws each) against the op-by-op views from the
    same generator state; the recording must have happened (no fallback)."""
    modules = [views.first, views.second] if hasattr(views, "first") else [views]
    torch.manual_seed(11)
    recorded = [views(images), views(images)]
    assert all(m.cuda_graph and m._graphs for m in modules), "the recording fell back"
    torch.manual_seed(11)
    if hasattr(views, "first"):
        eager = [(views.first.view(images), views.second.view(images)) for _ in range(2)]
    else:
        eager = [views.view(images) for _ in range(2)]
    for got, want in zip(recorded, eager, strict=True):
        for g, w in zip(got if isinstance(got, tuple) else [got],
                        want if isinstance(want, tuple) else [want], strict=True):
            assert g.shape == w.shape and g.is_contiguous(memory_format=torch.channels_last)
            # Normalised values span about [-2.2, 2.7]; different blur kernels between the
            # recording and the eager call could differ by float32 rounding, not more.
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    assert not torch.equal(recorded[0][0], recorded[1][0])  # fresh draws on each replay


@pytest.mark.parametrize("batch", [256, 512])
@pytest.mark.parametrize("crop", [True, False], ids=["full-photo", "loader-crops"])
def test_imagenet_views_record_at_224(batch, crop):
    side = 300 if crop else 224  # the loader's crops arrive at the view size
    _assert_recorded_equals_op_by_op(_imagenet_views(crop), _images(batch, side))


@pytest.mark.parametrize("deterministic", [False, True], ids=["autotuned", "deterministic"])
def test_views_record_under_the_training_backends(deterministic):
    """cuDNN autotuning on (a grouped blur convolution it has never seen) or deterministic
    kernels only, as `train` sets them."""
    with backends(CUDA, deterministic):
        _assert_recorded_equals_op_by_op(_imagenet_views(crop=False), _images(192, 224, 1))


def test_views_record_while_another_thread_pins_host_memory():
    """A thread allocating and freeing pinned host memory (cudaHostAlloc / cudaFreeHost: the
    streaming loader's pin-memory thread does this) throughout the recordings."""
    stop, errors, calls = threading.Event(), [], [0]
    empty_host_cache = getattr(torch._C, "_host_emptyCache", lambda: None)

    def pin() -> None:
        size = 1 << 20
        while not stop.is_set():
            try:
                torch.empty(size, dtype=torch.uint8).pin_memory()
                empty_host_cache()  # the next one is a fresh cudaHostAlloc, not a cached block
                calls[0] += 1
            except RuntimeError as err:
                errors.append(str(err))
            size += 4096

    thread = threading.Thread(target=pin, daemon=True)
    thread.start()
    try:
        for batch in (64, 96, 128):  # three recordings (a graph per batch shape)
            _assert_recorded_equals_op_by_op(_imagenet_views(crop=False), _images(batch, 224))
    finally:
        stop.set()
        thread.join()
    assert calls[0] > 0 and not errors, errors[:3]


def test_views_record_while_a_streamed_loader_runs(tmp_path, data_root):
    """The real thing: a streamed folder read by 2 workers into pinned memory, one batch taken
    (its pin-memory thread busy with the prefetched ones) while the views record."""
    from ssl_sec.data.index import build_index
    from ssl_sec.data.stream import CropStream, StreamLoader

    folder = Path(shutil.copytree(data_root / "imagefolder-sample", tmp_path / "sample"))
    index = build_index(folder)
    crops = [((0.08, 1.0), (3 / 4, 4 / 3))] * 2
    loader = StreamLoader(CropStream(index, 224, crops, seed=0), 32,
                          torch.Generator().manual_seed(0), CUDA, workers=2)
    views = _imagenet_views(crop=False)
    batches = iter(loader)
    for _ in range(3):
        v1, v2, _labels = next(batches)
        with torch.no_grad():
            a, b = views(v1, v2)
        assert a.shape == b.shape == (32, 3, 224, 224)
    assert views.first.cuda_graph and views.first._graphs
    assert views.second.cuda_graph and views.second._graphs


def test_cifar_views_still_record():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    views = ViewAugment(size=32, mean=mean, std=std).cuda()
    _assert_recorded_equals_op_by_op(views, _images(512, 32))


# ----------------------------------------------------------------------------- failures
def test_a_cuda_error_mid_epoch_ends_the_process_at_once(tmp_path, data_root):
    """A device-side assert at step 3 of a streamed run (a sticky CUDA error: every later CUDA
    call fails), with a thread that would block an ordinary exit: exit code 1 within
    EXIT_WITHIN_S of the failure, the workers gone, last.pt from step 2."""
    sample = Path(shutil.copytree(data_root / "imagefolder-sample", tmp_path / "sample"))
    proc, _ = fail_a_streamed_run(tmp_path, sample, "cuda-error-at-step", device="cuda")
    assert "CUDA" in proc.stderr


def test_cuda_out_of_memory_is_one_line(tmp_path, data_root):
    """A batch no GPU holds (ResNet-50, 2 x 4096 views at 224 px): one line naming the batch
    size and the GPU's memory, exit 2, within seconds."""
    cmd = [sys.executable, "-m", "ssl_sec", "pretrain", "recipes/quickstart.yaml",
           "device=cuda", "model.arch=resnet50", "augment.size=224", "data.train_subset=4096",
           "data.test_subset=100", "optim.batch_size=4096", "optim.epochs=1",
           "eval.knn_every=0", f"out_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "out of memory at optim.batch_size=4096" in err[0] and "GiB" in err[0]
    assert "optim.batch_size=2048" in err[0]
