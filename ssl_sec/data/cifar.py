"""CIFAR-10 / CIFAR-100 in the python pickle format, read with a restricted unpickler.

Datasets in ssl_sec are an :class:`ImageSet`: uint8 images ``(N, 3, H, W)`` and int64 labels
``(N,)``, nothing else. Augmentation happens later, on whole batches (``ssl_sec.augment``).

The pickles are data files from the internet, so they are never given to ``pickle.load``:
:class:`RestrictedUnpickler` resolves only the few numpy globals an ndarray needs.

Local files are not MD5-checked: re-packed copies (such as the shared test data) hold the genuine
pixels and labels but are not byte-identical to the official archives. Only a download is
checked against the official MD5.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import importlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ssl_sec.data.imageset import ImageSet
from ssl_sec.errors import ConfigError, DataError

__all__ = ["RestrictedUnpickler", "load_cifar", "resolve_root", "CIFAR_SPECS"]


# ---------------------------------------------------------------------------------------------
# restricted unpickling
# ---------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Any:
    # numpy >= 2 moved numpy.core to numpy._core (the old name warns); both spellings occur in
    # pickles, and both resolve to the same function.
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy multiarray._reconstruct not found")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python-2 str payloads re-encoded by a Python-3 pickler appear as _codecs.encode(s, "latin1").
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's ndarray reconstruction (and ``_codecs.encode``).

    A CIFAR pickle is a dict of lists, strings and uint8 ndarrays; any other global (``os.system``,
    ``builtins.eval``, ``subprocess.Popen``...) means the file is not a CIFAR batch, and is refused
    with a :class:`DataError` naming the global and the file, before anything is called.
    """

    def __init__(self, file: IO[bytes], source: str | os.PathLike[str], **kwargs: Any) -> None:
        kwargs.setdefault("encoding", "latin1")
        super().__init__(file, **kwargs)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise DataError(
                f"{self.source}: refusing to unpickle global {module}.{name}; a CIFAR file only "
                "holds numpy arrays, lists and strings (file is corrupt or malicious)"
            )
        return factory()


def _read_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path, encoding="latin1").load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # any unpickling failure of a corrupt file: one user-facing error
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# CIFAR format
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    url: str
    md5: str


CIFAR_SPECS: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _CifarSpec(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}

_FIX_HINT = "point at existing data with data.root=/path/to/data or SSL_SEC_DATA=/path/to/data"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """Explicit ``root``, else ``$SSL_SEC_DATA``, else ``./data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("SSL_SEC_DATA")
    if env:
        return Path(env).expanduser()
    return Path("data")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _read_pickle(path)
    if not isinstance(obj, dict) or "data" not in obj or label_key not in obj:
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: expected a dict with 'data' and '{label_key}', got {keys}")
    data, labels = obj["data"], obj[label_key]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{label_key}' is not a list of ints ({e})") from e
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{path}: {data.shape[0]} images but '{label_key}' has shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes})")
    return data, labels


def _read_classes(path: Path, names_key: str) -> list[str]:
    obj = _read_pickle(path)
    names = obj.get(names_key) if isinstance(obj, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{path}: expected a dict with a '{names_key}' list of names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _candidates(root: Path, spec: _CifarSpec) -> list[Path]:
    # root may be the parent of the batches folder or the batches folder itself.
    return [root / spec.folder, root]


def _find(root: Path, spec: _CifarSpec) -> Path | None:
    for cand in _candidates(root, spec):
        if (cand / spec.meta_file).is_file():
            return cand
    return None


def _safe_extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in parts:
                raise DataError(f"{archive}: refusing to extract unsafe path {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{archive}: refusing to extract {m.name!r} (not a regular file)")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second line of defence
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover
            tar.extractall(dest, members=members)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name: str, url: str, md5: str, root: Path, looked: str) -> None:
    """Fetch the archive at `url` into `root`, check its MD5, extract it safely (also STL-10's)."""
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".tar.gz.part", dir=root)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
        digest = _md5(tmp)
        if digest != md5:
            raise DataError(
                f"{name}: download from {url} has MD5 {digest}, expected {md5} "
                "(deleted; retry, or " + _FIX_HINT + ")"
            )
        _safe_extract(tmp, root)
    except DataError:
        raise
    except (OSError, http.client.HTTPException, tarfile.TarError, ValueError) as e:
        # URLError and socket timeouts are OSErrors; ValueError: a malformed URL
        reason = " ".join(str(getattr(e, "reason", None) or e).split())
        raise DataError(
            f"{name}: not found (looked in {looked}) and download from {url} failed "
            f"({reason}); {_FIX_HINT}"
        ) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def load_cifar(
    name: str,
    root: str | os.PathLike[str] | None = None,
    train: bool = True,
    download: bool = False,
) -> ImageSet:
    """Load CIFAR-10 or CIFAR-100 (fine labels) as an :class:`ImageSet` of uint8 (N, 3, 32, 32).

    ``root`` (else ``$SSL_SEC_DATA``, else ``./data``) is the folder that holds
    ``cifar-10-batches-py`` / ``cifar-100-python``, or that folder itself. With ``download=True``
    a missing dataset is fetched from the official URL into ``root`` and MD5-checked; existing
    local files are never MD5-checked (see the module docstring).

    Raises:
        ConfigError: ``name`` is not ``"cifar10"`` or ``"cifar100"``.
        DataError: missing, unreadable or malformed data, or a failed download; the message
            names the paths.
    """
    if name not in CIFAR_SPECS:
        raise ConfigError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_SPECS)}")
    spec = CIFAR_SPECS[name]
    base = resolve_root(root)
    folder = _find(base, spec)
    if folder is None:
        looked = ", ".join(str(c) for c in _candidates(base, spec))
        if not download:
            raise DataError(
                f"{name}: not found (looked in {looked}); {_FIX_HINT}, or set data.download=true"
            )
        _download(name, spec.url, spec.md5, base, looked)
        folder = _find(base, spec)
        if folder is None:
            raise DataError(
                f"{name}: downloaded archive did not contain {spec.folder}/{spec.meta_file}"
            )

    classes = _read_classes(folder / spec.meta_file, spec.names_key)
    datas, labels = [], []
    for fname in spec.train_files if train else spec.test_files:
        path = folder / fname
        if not path.is_file():
            raise DataError(f"{name}: missing file {path}; {_FIX_HINT}")
        d, y = _read_batch(path, spec.label_key, len(classes))
        datas.append(d)
        labels.append(y)
    images = torch.from_numpy(np.concatenate(datas)).view(-1, 3, 32, 32)
    return ImageSet(
        images=images.contiguous(),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
        name=name,
    )
