"""STL-10 in its official binary format (the ``stl10_binary/`` folder of stl10_binary.tar.gz).

Files: ``{train,test,unlabeled}_X.bin`` hold uint8 images of 3 x 96 x 96 bytes each, the three
channels one after the other and each channel stored **column-major** (the MATLAB order of the
original release); ``{train,test}_y.bin`` one uint8 label 1..10 per image; ``class_names.txt``
one name per line. Splits: ``train`` (5,000 labelled: the kNN bank and the probe's training
set), ``test`` (8,000 labelled) and ``unlabeled`` (100,000 images, labels -1: the split
self-supervised pretraining reads; its labels are never used).

As for CIFAR, local files are not MD5-checked (a re-packed copy holds the genuine pixels but
need not be byte-identical); a download is: the archive's MD5 and then each file's, with the
values torchvision's ``datasets/stl10.py`` lists.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ssl_sec.data.cifar import _FIX_HINT, _download, _md5, resolve_root
from ssl_sec.data.imageset import ImageSet
from ssl_sec.errors import ConfigError, DataError

__all__ = ["SPLITS", "load_stl10"]

FOLDER = "stl10_binary"
URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
# Per-file MD5s of the official archive (torchvision.datasets.STL10.train_list / test_list).
FILE_MD5 = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "unlabeled_X.bin": "5242ba1fed5e4be9e1e742405eb56ca4",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
}
CLASS_FILE = "class_names.txt"
SPLITS = ("train", "test", "unlabeled")
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE  # 27,648
_CHUNK = 1024  # images per read (27 MiB)


def _candidates(root: Path) -> list[Path]:
    # root may hold stl10_binary/ or be that folder itself.
    return [root / FOLDER, root]


def _find(root: Path) -> Path | None:
    for cand in _candidates(root):
        if (cand / CLASS_FILE).is_file():
            return cand
    return None


def _fix(folder: Path) -> str:
    return (f"the file is truncated or not from the official archive: delete {folder} and "
            "set data.download=true, or point data.root at a complete copy")


def _count_images(path: Path) -> int:
    """Images in an X file, from its size (each one IMAGE_BYTES)."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty; {_fix(path.parent)}")
    if size % IMAGE_BYTES:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of 3x96x96 images "
                        f"({IMAGE_BYTES:,} bytes each); {_fix(path.parent)}")
    return size // IMAGE_BYTES


def _read_images(path: Path, n: int) -> torch.Tensor:
    """uint8 (n, 3, 96, 96), rows first.

    Memory: the result is allocated once and filled chunk by chunk, each chunk read and
    transposed straight into it, so the 2.76 GB unlabeled split costs one copy plus one chunk
    (27 MiB) instead of the two full copies of `np.fromfile(...)` then a contiguous transpose.
    """
    images = torch.empty((n, 3, SIDE, SIDE), dtype=torch.uint8)
    out = images.numpy()  # shares the tensor's memory
    with open(path, "rb") as f:
        for start in range(0, n, _CHUNK):
            k = min(_CHUNK, n - start)
            block = np.fromfile(f, dtype=np.uint8, count=k * IMAGE_BYTES)
            if block.size != k * IMAGE_BYTES:
                raise DataError(f"{path}: ended after {start + block.size // IMAGE_BYTES} of "
                                f"{n} images while being read; {_fix(path.parent)}")
            # Each channel is stored column-major: (k, 3, column, row) -> (k, 3, row, column).
            out[start:start + k] = block.reshape(k, 3, SIDE, SIDE).transpose(0, 1, 3, 2)
    return images


def _read_labels(path: Path, n: int, images: Path, num_classes: int) -> torch.Tensor:
    labels = np.fromfile(path, dtype=np.uint8)
    if labels.size != n:
        raise DataError(f"{path}: {labels.size:,} labels for the {n:,} images of {images.name}; "
                        f"{_fix(path.parent)}")
    if labels.size and (labels.min() < 1 or labels.max() > num_classes):
        raise DataError(f"{path}: labels outside 1..{num_classes} (the classes of "
                        f"{CLASS_FILE}); {_fix(path.parent)}")
    return torch.from_numpy(labels.astype(np.int64) - 1)  # 1..10 -> 0..9


def _read_classes(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the class names ({e})") from e
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise DataError(f"{path}: expected one class name per line; {_fix(path.parent)}")
    return names


def _download_verified(base: Path, looked: str) -> None:
    """Download and extract the archive into a staging folder in `base`, check each file's
    MD5 there, then move stl10_binary/ into place: a failed check leaves nothing behind."""
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".stl10-", dir=base))
    except OSError as e:
        raise DataError(f"stl10: cannot create {base} for the download ({e.strerror or e}); "
                        f"{_FIX_HINT}") from e
    try:
        _download("stl10", URL, MD5, staging, looked)
        extracted = staging / FOLDER
        for name, md5 in FILE_MD5.items():
            path = extracted / name
            if not path.is_file():
                raise DataError(f"stl10: the archive from {URL} has no {FOLDER}/{name} "
                                f"(deleted; retry, or {_FIX_HINT})")
            digest = _md5(path)
            if digest != md5:
                raise DataError(f"stl10: {FOLDER}/{name} from {URL} has MD5 {digest}, expected "
                                f"{md5} (deleted; retry, or {_FIX_HINT})")
        try:
            os.replace(extracted, base / FOLDER)
        except OSError as e:
            raise DataError(f"stl10: cannot move the download to {base / FOLDER} "
                            f"({e.strerror or e}); remove what is there and retry") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_stl10(root: str | os.PathLike[str] | None = None, split: str = "train",
               download: bool = False) -> ImageSet:
    """One split of STL-10 as an :class:`ImageSet` of uint8 (N, 3, 96, 96).

    ``root`` (else ``$SSL_SEC_DATA``, else ``./data``) holds ``stl10_binary/`` or is that
    folder. ``split``: ``train`` / ``test`` (labels 0..9) or ``unlabeled`` (labels -1). With
    ``download=True`` a missing dataset is fetched from the official URL into ``root`` and
    MD5-checked (archive and files).

    Raises:
        ConfigError: an unknown split.
        DataError: missing, unreadable or malformed files, or a failed download: one line
            naming the file and the fix.
    """
    if split not in SPLITS:
        raise ConfigError(f"stl10 has no split {split!r}; its splits: {', '.join(SPLITS)}")
    base = resolve_root(root)
    folder = _find(base)
    if folder is None:
        looked = ", ".join(str(c) for c in _candidates(base))
        if not download:
            raise DataError(f"stl10: not found (looked in {looked} for {CLASS_FILE}); "
                            f"{_FIX_HINT}, or set data.download=true")
        _download_verified(base, looked)
        folder = base / FOLDER
    classes = _read_classes(folder / CLASS_FILE)
    x_path = folder / f"{split}_X.bin"
    y_path = None if split == "unlabeled" else folder / f"{split}_y.bin"
    for path in (x_path, y_path):
        if path is not None and not path.is_file():
            raise DataError(f"stl10: missing file {path}; {_FIX_HINT}, or delete {folder} and "
                            "set data.download=true")
    n = _count_images(x_path)
    # Labels first: a mismatched pair is refused before 2.76 GB are read.
    labels = (torch.full((n,), -1, dtype=torch.int64) if y_path is None
              else _read_labels(y_path, n, x_path, len(classes)))
    return ImageSet(images=_read_images(x_path, n), labels=labels, classes=classes,
                    name="stl10")
