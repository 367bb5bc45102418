"""ImageFolder layout (``root/<wnid>/<image>``) decoded once into an in-memory uint8 ImageSet.

Preprocessing step: every image is decoded (``PIL ... .convert("RGB")``, so greyscale, CMYK and
palette images become RGB), its shorter side resized to ``size`` (bilinear, antialiased) and the
centre ``size x size`` crop kept, the same as torchvision's ``Resize(size)`` + ``CenterCrop(size)``.
The set is then held as uint8 ``(N, 3, size, size)`` and every later augmentation (random resized
crops included) works on those pixels. That is the protocol for small sets (Imagenette, ImageNet-100
at 64-128 px, about 5-6 GB at 128 px for ImageNet-100). Large sets, and crops from the
full-resolution photos, are streamed instead (`data.mode: stream`, ssl_sec/data/stream.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_sec.data.crops import BAD_HINT, BadFileLog, open_image
from ssl_sec.data.imageset import ImageSet
from ssl_sec.errors import ConfigError, DataError

__all__ = ["load_imagefolder", "list_images", "read_class_file", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_class_file(path: str | os.PathLike[str]) -> list[str]:
    """Class ids from a text file: one per line; blank lines and ``#`` comments are ignored."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read class list {p} ({e.strerror or e})") from e
    ids = [ln.split("#", 1)[0].strip() for ln in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise DataError(f"class list {p} is empty")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"class list {p} repeats {dup}")
    return ids


def _decode(path: Path, size: int) -> np.ndarray:
    with open_image(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) != size:
            # torchvision Resize(int): shorter side -> size, longer side truncated.
            if w <= h:
                new = (size, int(size * h / w))
            else:
                new = (int(size * w / h), size)
            im = im.resize(new, Image.Resampling.BILINEAR)
            w, h = im.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


def list_images(
    root: str | os.PathLike[str],
    classes_file: str | os.PathLike[str] | None = None,
    max_per_class: int | None = None,
) -> tuple[list[Path], list[int], list[str]]:
    """The image files of an ImageFolder tree, their labels and the class names.

    Labels follow torchvision's ImageFolder: classes sorted by name, label = index in that
    order (also with a class list, so the labels match an ImageFolder over a folder holding
    only those classes). Files in sorted name order; extensions as ``IMG_EXTENSIONS``.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(
            f"image folder {base} does not exist; point data.root (or SSL_SEC_DATA) at it"
        )
    present = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes_file is not None:
        wanted = read_class_file(classes_file)
        missing = [c for c in wanted if c not in set(present)]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{len(missing)} of {len(wanted)} classes listed in {classes_file} are missing "
                f"under {base}: {shown}"
            )
        classes = sorted(wanted)
    else:
        classes = present
    if not classes:
        raise DataError(f"image folder {base} has no class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = sorted(
            f.name
            for f in (base / cls).iterdir()
            if f.suffix.lower() in IMG_EXTENSIONS and f.is_file()
        )
        if not names:
            raise DataError(
                f"class folder {base / cls} holds no images ({', '.join(IMG_EXTENSIONS)})"
            )
        if max_per_class is not None:
            names = names[:max_per_class]
        files += [base / cls / n for n in names]
        labels += [label] * len(names)
    return files, labels, classes


def load_imagefolder(
    root: str | os.PathLike[str],
    size: int,
    classes_file: str | os.PathLike[str] | None = None,
    max_per_class: int | None = None,
    num_threads: int | None = None,
    skip_bad: bool = False,
    log=None,
) -> ImageSet:
    """Decode an ImageFolder tree into an :class:`ImageSet` of uint8 ``(N, 3, size, size)``.

    Args:
        root: folder with one sub-folder per class (named by WNID for ImageNet subsets).
        size: side of the stored square images (see the module docstring).
        classes_file: optional class list (e.g. ImageNet-100's ``classes.txt``): only those
            classes are loaded, and every listed class must exist under ``root``.
        max_per_class: keep at most this many images per class (the first in name order).
        num_threads: decode threads (default: ``min(32, cpu_count + 4)``, Python's default).
        skip_bad: leave out files that cannot be decoded (reported once through ``log``,
            default stderr) instead of stopping with the first one's name.

    Labels follow torchvision's ImageFolder: classes sorted by name, label = index in that
    order (also with a class list, so the labels match an ImageFolder over a folder holding only
    those classes). Files are taken in sorted name order; extensions as ``IMG_EXTENSIONS``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"load_imagefolder: size must be a positive int, got {size!r}")
    if max_per_class is not None and (
        isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class <= 0
    ):
        raise ConfigError(
            f"load_imagefolder: max_per_class must be a positive int, got {max_per_class!r}"
        )
    files, labels, classes = list_images(root, classes_file, max_per_class)
    base = Path(root).expanduser()

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)

    def work(i: int) -> str | None:
        try:
            out[i] = _decode(files[i], size)
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{err}{BAD_HINT}") from None
            return str(err)
        return None

    # PIL releases the GIL while decoding and resizing, so threads scale on JPEG decode.
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        errors = list(pool.map(work, range(len(files))))
    BadFileLog(log).bad(filter(None, errors))
    good = [i for i, err in enumerate(errors) if err is None]
    if not good:
        raise DataError(f"image folder {base} has no readable images")
    images = torch.from_numpy(out[good]).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor([labels[i] for i in good], dtype=torch.int64), classes,
                    name=base.name)
