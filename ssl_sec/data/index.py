"""The file index of an image folder: paths, labels, classes and each file's header (size,
format), built once and cached, so that a streamed run of a 126,000-image folder starts in
seconds and finds bad files before the first step.

The cache is a JSON file beside the data (`<folder>/.ssl_sec_index.json`) or, where that
folder is read-only, in the run directory. A file is probed again only when its size or
modification time changed; a deleted file drops out, a new one is probed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssl_sec.data.crops import BAD_HINT, BadFileLog, probe
from ssl_sec.data.imagefolder import list_images
from ssl_sec.errors import DataError

CACHE_NAME = ".ssl_sec_index.json"
CACHE_FORMAT = "ssl_sec.index/2"


@dataclass
class FileIndex:
    """An image folder as a list of files.

    root: the folder. files: paths relative to it. labels: int64 (N,). classes: class names
    (labels index them). sizes: (width, height) of each file's full-resolution image.
    formats: PIL's format name per file ("JPEG", "PNG", ...). modes: PIL's mode per file
    ("RGB", "L", "CMYK", ...). bad: (path, reason) of files left out by `skip_bad_images`.
    """

    root: Path
    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    sizes: list[tuple[int, int]]
    formats: list[str]
    modes: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def subset(self, indices: list[int]) -> FileIndex:
        return FileIndex(self.root, [self.files[i] for i in indices], self.labels[indices],
                         list(self.classes), [self.sizes[i] for i in indices],
                         [self.formats[i] for i in indices], [self.modes[i] for i in indices],
                         list(self.bad))

    def select_classes(self, class_ids: list[int]) -> FileIndex:
        keep = set(class_ids)
        return self.subset([i for i, y in enumerate(self.labels.tolist()) if y in keep])

    def digest(self) -> str:
        """Identifies the images (root, files, sizes): the feature cache's key for a stream."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for name, size in zip(self.files, self.sizes, strict=True):
            h.update(f"{name}|{size[0]}x{size[1]}\n".encode())
        return h.hexdigest()


def _cache_path(folder: Path, fallback: Path | None) -> Path | None:
    beside = folder / CACHE_NAME
    # Writable, and not marked read-only (root may write anywhere, but a folder without write
    # bits is someone's shared data: leave it alone).
    if os.access(folder, os.W_OK) and folder.stat().st_mode & 0o222:
        return beside
    if fallback is None:
        return None
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return fallback / f"index-{key}.json"


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("format") == CACHE_FORMAT
    return data.get("files", {}) if ok else {}


def _write_cache(path: Path | None, entries: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "files": entries}))
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written only costs the next start its probes
        tmp.unlink(missing_ok=True)


def build_index(folder: str | os.PathLike[str], classes_file: str | os.PathLike[str] | None = None,
                skip_bad: bool = False, cache_fallback: Path | None = None,
                threads: int | None = None, log=None) -> FileIndex:
    """List an ImageFolder tree and probe every file's header (cached, see the module).

    A file whose header cannot be read (empty, not an image, a decompression bomb) is a
    `DataError` naming it, or with `skip_bad` is left out and reported once through `log`
    (default: stderr). Files that pass here can still fail at decode time (a truncated JPEG):
    the streaming dataset applies the same policy there.
    """
    base = Path(folder).expanduser()
    paths, labels, classes = list_images(base, classes_file)
    cache_path = _cache_path(base, cache_fallback)
    cached = _read_cache(cache_path)

    def entry(p: Path) -> list:
        st = p.stat()
        stat = (st.st_size, st.st_mtime_ns)
        old = cached.get(str(p.relative_to(base)))
        if old is not None and tuple(old[:2]) == stat:
            return old
        try:
            return [*stat, *probe(p), None]
        except DataError as err:
            return [*stat, 0, 0, "", "", str(err)]

    # Stats and header reads are mostly waiting on the disk: threads overlap them.
    with ThreadPoolExecutor(max_workers=threads or min(32, (os.cpu_count() or 1) * 4)) as pool:
        entries = list(pool.map(entry, paths))
    fresh = {str(p.relative_to(base)): e for p, e in zip(paths, entries, strict=True)}
    if fresh != cached:  # (unchanged: no rewrite of a ~100k-entry file at every start)
        _write_cache(cache_path, fresh)
    bad = [(str(p), e[6]) for p, e in zip(paths, entries, strict=True) if e[6]]
    if bad and not skip_bad:
        more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][1]}{more}{BAD_HINT}")
    BadFileLog(log).bad(reason for _, reason in bad)
    good = [i for i, e in enumerate(entries) if not e[6]]
    if not good:
        raise DataError(f"image folder {base} has no readable images")
    return FileIndex(base, [str(paths[i].relative_to(base)) for i in good],
                     torch.tensor([labels[i] for i in good], dtype=torch.int64), classes,
                     [(entries[i][2], entries[i][3]) for i in good],
                     [entries[i][4] for i in good], [entries[i][5] for i in good], bad)
