"""ImageNet-style JPEG folders built from the shared Imagenette sample, for benchmarks and tests.

The shared sample (`$SSL_SEC_DATA/imagefolder-sample`, 10 classes x 30 Imagenette JPEGs) is
already shrunk to 224x224, while ImageNet photos are about 500x375: a loader that cuts its
crops from the full-resolution photo, and a decoder, must be measured and tested on files of
the real size. `build_jpeg_folder` therefore re-encodes those photos at 500x375 (bicubic
upscale to 560x375, a 500-px window, JPEG quality 90), as many copies as asked. Copy c of a
photo is shifted by 7c px (mod 60) and mirrored when c is odd, so no two files are the same
bytes; validation copies continue the numbering after the training copies, so a val file is
never a train file (below 60 copies per photo). Say so wherever a result comes from such a
folder (`NOTE`).

Used by eval/bench_imagefolder.py, eval/bench_imagenet_gpu.py (`from jpeg_folder import ...`,
the eval/ folder is on their sys.path) and tests/test_recipes.py. It needs only Pillow.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["NOTE", "build_jpeg_folder", "sample_folder"]

NOTE = ("test folders built by re-encoding the 300 shared Imagenette photos (224x224) at "
        "ImageNet's typical 500x375 (bicubic upscale, JPEG quality 90), each copy shifted "
        "horizontally (odd copies mirrored) so files differ")


def sample_folder() -> Path:
    """The shared sample: `$SSL_SEC_DATA/imagefolder-sample`, else `../shared/data/...` beside
    the checkout (where CI and the GPU machines have it)."""
    data = os.environ.get("SSL_SEC_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(data) / "imagefolder-sample"


def _photos(sample: Path, classes: int | None) -> list[Path]:
    """The sample's photos, interleaved class by class (first photo of every class, then the
    second, ...), so that the first n files of a folder of any size cover the classes evenly."""
    folders = sorted(d for d in sample.iterdir() if d.is_dir())[:classes]
    per_class = [sorted(d.glob("*.jpg")) for d in folders]
    if not per_class or not all(per_class):
        raise FileNotFoundError(f"no class folders of .jpg files under {sample}")
    longest = max(map(len, per_class))
    return [files[i] for i in range(longest) for files in per_class if i < len(files)]


def build_jpeg_folder(root: str | Path, n: int, val: int = 0, *, classes: int | None = None,
                      size: tuple[int, int] = (500, 375), quality: int = 90,
                      sample: str | Path | None = None, threads: int | None = None) -> Path:
    """`root/train/<wnid>/*.jpg` with `n` images and, when `val` > 0, `root/val/<wnid>/*.jpg`
    with `val` images, at `size` (width, height) from the shared sample; returns `root`.

    classes: use the first N classes of the sample (default all 10). Files already present are
    kept (a folder is built once and reused); each file is written to a temporary name and
    renamed, so an interrupted build never leaves a truncated JPEG behind. threads: encoder
    threads (Pillow releases the GIL; default: every core).
    """
    from PIL import Image

    root = Path(root)
    photos = _photos(Path(sample) if sample else sample_folder(), classes)
    width, height = size
    wide = round(width * 1.12)  # room for the per-copy shift

    def make(split: str, k: int, copy: int) -> None:
        src = photos[k % len(photos)]
        out = root / split / src.parent.name / f"{k:06d}.jpg"
        if out.exists():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(src).convert("RGB").resize((wide, height), Image.Resampling.BICUBIC)
        shift = copy * 7 % (wide - width)
        img = img.crop((shift, 0, shift + width, height))
        if copy % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        img.save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, out)

    train_copies = -(-n // len(photos))  # ceil: val copies start after the last train copy
    jobs = [("train", k, k // len(photos)) for k in range(n)]
    jobs += [("val", k, train_copies + k // len(photos)) for k in range(val)]
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count()) as pool:
        list(pool.map(lambda job: make(*job), jobs))  # list(): re-raise a worker's error
    return root
