#!/usr/bin/env bash
# A compact data pack for an offline GPU machine: a CIFAR-10 subset in the python pickle format
# ssl_sec reads, the shared CIFAR-100 subset and the Imagenette JPEG sample, xz-compressed and split into parts small
# enough to travel (scripts/gpu_check.sh --pack DIR unpacks it there).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_pack.sh DIR [--train N] [--test N] [--part-mib M] [--data SRC] [--python PY]

Writes to DIR:
  ssl_sec_data.tar.xz.NN  the pack, in parts of at most M MiB (cat them in order to rejoin)
  SHA256SUMS              checksums of the parts (gpu_check.sh verifies them before unpacking)
  pack.json               what is inside, its sizes and how it was made
Inside (the layout of SSL_SEC_DATA):
  cifar-10-batches-py/    data_batch_1..5 with the first N/5 rows of each, test_batch with the
                          first N rows of the test set (original order and labels), the original
                          batches.meta; pickles of dicts with str keys (protocol 4): what ssl_sec
                          and torchvision (encoding='latin1') read
  cifar-100-python/       the shared CIFAR-100 subset, unchanged (the cifar100 recipes' GPU runs)
  imagefolder-sample/     the 300 Imagenette JPEGs, unchanged (eval/jpeg_folder.py builds the
                          500x375 ImageNet-size folders from them on the GPU machine)
  PACK.md                 the same description, in the pack
Then on the GPU machine:  bash scripts/gpu_check.sh --wheels WHEELS --pack DIR

options:
  --train N      CIFAR-10 training images, a multiple of 5 (default 10000; at most 50000)
  --test N       CIFAR-10 test images (default 2000; at most 10000)
  --part-mib M   largest part in MiB (default 60)
  --data SRC     the full data to take them from (default: $SSL_SEC_DATA, else ../shared/data)
  --python PY    an interpreter with ssl_sec's needs (default: .venv/bin/python, else python3)
Compression: xz with a byte-delta filter (neighbouring pixels are alike) then LZMA2 -9e,
single-threaded, so packing takes about a minute; unpacking needs only Python's lzma.
EOF
}

DIR=""
TRAIN=10000
TEST=2000
PART_MIB=60
SRC=""
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --train) TRAIN=${2:?--train needs a number}; shift 2 ;;
    --test) TEST=${2:?--test needs a number}; shift 2 ;;
    --part-mib) PART_MIB=${2:?--part-mib needs a number}; shift 2 ;;
    --data) SRC=${2:?--data needs a folder}; shift 2 ;;
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_pack.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
if [ -z "$DIR" ]; then
  usage >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SRC=${SRC:-${SSL_SEC_DATA:-../shared/data}}
if [ ! -f "$SRC/cifar-10-batches-py/batches.meta" ] || [ ! -d "$SRC/imagefolder-sample" ] \
    || [ ! -f "$SRC/cifar-100-python/meta" ]; then
  echo "gpu_pack.sh: '$SRC' lacks cifar-10-batches-py/, cifar-100-python/ or imagefolder-sample/; pass --data" >&2
  exit 2
fi
mkdir -p "$DIR"

"$PY" - "$SRC" "$DIR" "$TRAIN" "$TEST" "$PART_MIB" <<'EOF'
import hashlib
import json
import lzma
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, ".")  # the checkout (the script runs from its root)
from ssl_sec.data.cifar import RestrictedUnpickler  # noqa: E402

src, out = Path(sys.argv[1]), Path(sys.argv[2])
train, test, part_mib = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if train % 5 or not 0 < train <= 50_000 or not 0 < test <= 10_000:
    sys.exit(f"gpu_pack.sh: --train {train} must be a multiple of 5 in 5..50000 and "
             f"--test {test} in 1..10000")
NAME = "ssl_sec_data.tar.xz"
FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1},
           {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def subset(path: Path, rows: int, dest: Path) -> int:
    """The first `rows` rows of a CIFAR batch: data, labels and filenames cut together; read
    with latin1 (str keys, as the originals give), written with protocol 4 (raw bytes: no
    re-encoded latin1 strings, a third smaller than protocol 2)."""
    with open(path, "rb") as f:  # never plain pickle.load on a data file (ssl_sec/data/cifar.py)
        batch = RestrictedUnpickler(f, path, encoding="latin1").load()
    cut = {k: v[:rows] if k in ("data", "labels", "filenames") else v for k, v in batch.items()}
    dest.write_bytes(pickle.dumps(cut, protocol=4))
    return len(cut["labels"])


class Parts:
    """A write-only file that rolls over to NAME.00, NAME.01, ... at `limit` bytes."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit, self.paths, self.f, self.used = folder, limit, [], None, 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.f is None or self.used == self.limit:
                self.close()
                self.paths.append(self.folder / f"{NAME}.{len(self.paths):02d}")
                self.f, self.used = open(self.paths[-1], "wb"), 0
            n = min(len(view), self.limit - self.used)
            self.f.write(view[:n])
            self.used += n
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


t0 = time.perf_counter()
for old in out.glob(f"{NAME}.*"):
    old.unlink()
with tempfile.TemporaryDirectory() as tmp:
    stage = Path(tmp)
    cifar = stage / "cifar-10-batches-py"
    cifar.mkdir()
    counts = {f"data_batch_{i}": subset(src / "cifar-10-batches-py" / f"data_batch_{i}",
                                        train // 5, cifar / f"data_batch_{i}") for i in range(1, 6)}
    counts["test_batch"] = subset(src / "cifar-10-batches-py" / "test_batch", test,
                                  cifar / "test_batch")
    shutil.copy2(src / "cifar-10-batches-py" / "batches.meta", cifar / "batches.meta")
    shutil.copytree(src / "cifar-100-python", stage / "cifar-100-python")
    shutil.copytree(src / "imagefolder-sample", stage / "imagefolder-sample")
    jpegs = len(list((stage / "imagefolder-sample").glob("*/*.jpg")))
    about = (f"# ssl_sec GPU data pack\n\nMade by scripts/gpu_pack.sh from {src.resolve()}.\n\n"
             f"- cifar-10-batches-py/: a subset of CIFAR-10, {train:,} training images (the first "
             f"{train // 5:,} rows of each data_batch_N) and {test:,} test images (the first rows "
             "of test_batch), original order and labels; pickled dicts with str keys (protocol "
             "4); batches.meta is the original.\n"
             "- cifar-100-python/: the shared CIFAR-100 subset, unchanged.\n"
             f"- imagefolder-sample/: the {jpegs} Imagenette JPEGs (224x224) of the shared data, "
             "unchanged.\n")
    (stage / "PACK.md").write_text(about)
    raw = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    parts = Parts(out, part_mib * 2**20)
    with lzma.open(parts, "wb", format=lzma.FORMAT_XZ, filters=FILTERS) as xz, \
            tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for item in sorted(stage.iterdir()):
            tar.add(item, arcname=item.name)
    parts.close()

sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parts.paths}
(out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
sizes = {p.name: p.stat().st_size for p in parts.paths}
total = sum(sizes.values())
manifest = {"made_by": "scripts/gpu_pack.sh", "source": str(src.resolve()),
            "cifar10": {"train": train, "test": test, "rows": counts, "pickle_protocol": 4},
            "cifar100": "the shared subset, unchanged", "imagefolder_sample_jpegs": jpegs,
            "uncompressed_bytes": raw,
            "compression": "xz: delta(dist=1) + lzma2 -9e", "part_limit_mib": part_mib,
            "parts": sizes, "total_bytes": total, "seconds": round(time.perf_counter() - t0, 1)}
(out / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n")
for name, size in sizes.items():
    print(f"  {name}: {size / 2**20:.2f} MiB")
print(f"gpu_pack.sh: {len(sizes)} part(s), {total / 2**20:.2f} MiB ({total:,} bytes) from "
      f"{raw / 2**20:.1f} MiB in {manifest['seconds']} s: CIFAR-10 {train:,} train + {test:,} "
      f"test, {jpegs} JPEGs -> {out}")
EOF
