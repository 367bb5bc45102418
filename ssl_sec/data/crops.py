"""Reading one photo from disk: its header, random-resized crops cut from the full-resolution
image, or the centre crop of evaluation. What a DataLoader worker does per image.

Every failure is a `DataError` that names the file: unreadable, empty, not an image,
truncated, or a decompression bomb (more pixels than PIL's `Image.MAX_IMAGE_PIXELS`, whose
warning is treated as the error it warns of). Greyscale, palette, CMYK and alpha images
become RGB, as torchvision's ImageFolder loader makes them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_sec.errors import DataError

Box = tuple[int, int, int, int]  # top, left, height, width in full-resolution pixels

# Appended to every bad-file error: the fix.
BAD_HINT = "; remove or replace it, or set data.skip_bad_images=true to skip bad files"


class BadFileLog:
    """Reports each skipped bad file once per process (default: to stderr)."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.seen: set[str] = set()

    def bad(self, reasons: Iterable[str]) -> None:
        for reason in reasons:
            if reason not in self.seen:
                self.seen.add(reason)
                self.log(f"skipping bad image: {reason}")


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """`PIL.Image.open` (header only until pixels are needed) with every failure, decoding
    included, turned into one `DataError` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {path} is a decompression bomb (more than PIL's limit of "
                        f"{Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        what = "an empty file (0 bytes)" if size == 0 else "not an image PIL can read"
        raise DataError(f"image {path} is {what}") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated data, bad headers
        raise DataError(f"image {path} cannot be decoded ({err})") from None


def probe(path: str | Path) -> tuple[int, int, str, str]:
    """(width, height, format, mode) from the file's header, without decoding the pixels."""
    with open_image(path) as im:
        return im.size[0], im.size[1], str(im.format), str(im.mode)


def crop_box(rng: np.random.Generator, height: int, width: int,
             scale: Sequence[float], ratio: Sequence[float]) -> Box:
    """torchvision's `RandomResizedCrop.get_params`: up to 10 draws of an area fraction in
    `scale` and a log-uniform aspect ratio in `ratio`, the first whose rounded box fits, at a
    uniform position; else the whole image cut to the nearest allowed ratio, centred."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    w, h = centre_fallback(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def centre_fallback(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """torchvision's (w, h) when no try fits: the whole image, cut to the nearest allowed
    aspect ratio (centred by the caller)."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, int(round(width / ratio[0]))
    if in_ratio > ratio[1]:
        return int(round(height * ratio[1])), height
    return width, height


def _decode(im: Image.Image, smallest: float, size: int) -> tuple[Image.Image, float, float]:
    """Decode at the smallest JPEG scale (1/2, 1/4, 1/8) that still leaves `smallest` full-
    resolution pixels at least `size` wide, so reduced decoding never adds upsampling; RGB.
    Returns the image and its scale relative to the full resolution (x, y)."""
    width, height = im.size
    factor = 1
    while factor < 8 and smallest / (2 * factor) >= size:
        factor *= 2
    if factor > 1 and im.format == "JPEG":
        im.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
    rgb = im.convert("RGB")
    return rgb, rgb.size[0] / width, rgb.size[1] / height


def read_crops(path: str | Path, size: int, rng: np.random.Generator,
               views: Sequence[tuple[Sequence[float], Sequence[float]]]) -> list[np.ndarray]:
    """One random-resized crop per view (its (scale, ratio)), each a uint8 (size, size, 3)
    array, cut from the full-resolution photo and resized with PIL's antialiased bilinear
    filter, as torchvision's RandomResizedCrop on a PIL image."""
    with open_image(path) as im:
        width, height = im.size
        boxes = [crop_box(rng, height, width, scale, ratio) for scale, ratio in views]
        rgb, sx, sy = _decode(im, min(min(h, w) for _, _, h, w in boxes), size)
        return [np.array(rgb.resize((size, size), Image.Resampling.BILINEAR,
                                      box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)),
                           dtype=np.uint8)
                for top, left, h, w in boxes]


def read_centre(path: str | Path, size: int, resize: int) -> np.ndarray:
    """The evaluation view: shorter side resized to `resize`, centre `size x size` crop
    (torchvision's Resize(resize) + CenterCrop(size)), uint8 (size, size, 3)."""
    with open_image(path) as im:
        width, height = im.size
        side = min(width, height) * size / resize  # the centre box, full-resolution pixels
        rgb, sx, sy = _decode(im, side, size)
        left, top = (width - side) / 2, (height - side) / 2
        return np.array(rgb.resize((size, size), Image.Resampling.BILINEAR,
                                     box=(left * sx, top * sy, (left + side) * sx,
                                          (top + side) * sy)), dtype=np.uint8)
