"""Streaming an image folder: crops from the full-resolution photo, the crop law, the file
index and its cache, bad files, exact resume, DDP sharding, stream vs memory pixels."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_cfg
from PIL import Image
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from ssl_sec import cli
from ssl_sec.checkpoint import load_checkpoint
from ssl_sec.data import index as index_module
from ssl_sec.data import load_imagefolder, load_splits
from ssl_sec.data.crops import crop_box, read_centre, read_crops
from ssl_sec.data.index import build_index
from ssl_sec.data.stream import CropStream, StreamLoader, _EpochBatches
from ssl_sec.engine import train
from ssl_sec.errors import DataError
from ssl_sec.recipe import from_dict

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagefolder-sample"


def _pattern(width: int = 640, height: int = 480) -> np.ndarray:
    """A synthetic photo whose every 16x16 block has its own colour: (block row, block col, 0)."""
    ys, xs = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = (ys // 16) * 8
    img[..., 1] = (xs // 16) * 6
    img[..., 2] = 128
    return img


def _folder(tmp_path: Path, files: dict[str, bytes | np.ndarray], fmt: str = "PNG") -> Path:
    """An ImageFolder with the given files (arrays are encoded as `fmt`)."""
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, np.ndarray):
            Image.fromarray(content).save(path, format=fmt, quality=95)
        else:
            path.write_bytes(content)
    return tmp_path


def _bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header announces 1.6 billion pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- crops
def test_crops_come_from_the_full_resolution_photo(tmp_path):
    photo = _pattern()
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    views = [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.3), (1.0, 1.0))]
    crops = read_crops(path, 64, np.random.default_rng(3), views)
    rng = np.random.default_rng(3)
    for crop, (scale, ratio) in zip(crops, views, strict=True):
        top, left, h, w = crop_box(rng, 480, 640, scale, ratio)
        want = Image.fromarray(photo).resize((64, 64), Image.Resampling.BILINEAR,
                                             box=(left, top, left + w, top + h))
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, np.asarray(want))
        # the corners carry the block codes of the box's corners in the original photo
        assert abs(int(crop[0, 0, 0]) - (top // 16) * 8) <= 8
        assert abs(int(crop[0, 0, 1]) - (left // 16) * 6) <= 6
        assert abs(int(crop[-1, -1, 0]) - ((top + h - 1) // 16) * 8) <= 8


def test_reduced_jpeg_decoding_never_upsamples_and_matches_full_decoding(tmp_path):
    photo = _pattern(800, 600)
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(path, quality=95)
    full = np.asarray(Image.open(path).convert("RGB"))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        (crop,) = read_crops(path, 64, rng, [((0.3, 1.0), (3 / 4, 4 / 3))])
        top, left, h, w = crop_box(np.random.default_rng(seed), 600, 800, (0.3, 1.0), (3 / 4, 4 / 3))
        want = np.asarray(Image.fromarray(full).resize((64, 64), Image.Resampling.BILINEAR,
                                                       box=(left, top, left + w, top + h)))
        assert np.abs(crop.astype(int) - want.astype(int)).mean() < 3.0  # JPEG DCT scaling


def test_crop_box_law_matches_torchvision_get_params():
    """Area fraction and aspect ratio of 4,000 boxes against 4,000 of torchvision's."""
    rng = np.random.default_rng(0)
    ours = np.array([crop_box(rng, 375, 500, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)])
    torch.manual_seed(0)
    image = torch.zeros(3, 375, 500)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(4000)])
    for boxes in (ours, theirs):
        assert (boxes[:, 0] + boxes[:, 2] <= 375).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all()
    for stat in (lambda b: b[:, 2] * b[:, 3] / (375 * 500), lambda b: np.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0] + b[:, 2] / 2, lambda b: b[:, 1] + b[:, 3] / 2):
        assert stats.ks_2samp(stat(ours), stat(theirs)).pvalue > 1e-3


def test_stream_and_memory_give_the_same_pixels():
    """Evaluation views: streamed (resize 224, centre 224) equals memory mode's decoding at
    224; a crop that is only upscaled differs from the memory path's GPU warp by resampling."""
    memory = load_imagefolder(SAMPLE, 224, max_per_class=2)
    files = sorted((SAMPLE / memory.classes[0]).iterdir())[:2]
    for k, f in enumerate(files):
        streamed = read_centre(f, 224, 224)
        np.testing.assert_array_equal(torch.from_numpy(streamed).permute(2, 0, 1),
                                      memory.images[k])
    from ssl_sec.augment import resized_crop

    (crop,) = read_crops(files[0], 128, np.random.default_rng(1), [((0.05, 0.1), (1.0, 1.0))])
    top, left, h, w = crop_box(np.random.default_rng(1), 224, 224, (0.05, 0.1), (1.0, 1.0))
    warp = resized_crop(memory.images[:1].float(), torch.tensor([[top, left, h, w]]).float(), 128)
    diff = (warp[0].permute(1, 2, 0) - torch.from_numpy(crop).float()).abs().mean()
    assert diff < 4.0  # grey levels: PIL's and torch's bilinear differ at the crop's edges


def test_views_use_their_own_crop_settings(tmp_path):
    root = _folder(tmp_path / "f", {"a/0.png": _pattern()})
    index = build_index(root)
    whole, small = CropStream(index, 32, [((1.0, 1.0), (4 / 3, 4 / 3)),
                                          ((0.05, 0.05), (1.0, 1.0))], seed=0).crops(0, 0)
    full = np.asarray(Image.fromarray(_pattern()).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(whole, full)
    assert np.abs(small.astype(int) - full.astype(int)).mean() > 5


# ----------------------------------------------------------------------------- index
def test_index_is_cached_and_reprobes_only_changed_files(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f", {f"c{k}/{i}.png": _pattern(64, 48) for k in range(2)
                                    for i in range(3)})
    first = build_index(root)
    assert len(first) == 6 and first.classes == ["c0", "c1"] and first.sizes[0] == (64, 48)
    assert (root / ".ssl_sec_index.json").is_file()
    calls = []
    monkeypatch.setattr(index_module, "probe", lambda p: calls.append(p) or (64, 48, "PNG", "RGB"))
    assert build_index(root).files == first.files and calls == []
    Image.fromarray(_pattern(32, 32)).save(root / "c1" / "9.png")
    again = build_index(root)
    assert len(again) == 7 and [p.name for p in calls] == ["9.png"]
    assert again.digest() != first.digest()


def test_read_only_folder_caches_in_the_run_directory(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f", {"a/0.png": _pattern(64, 48)})
    monkeypatch.setattr(index_module.os, "access", lambda path, mode: False)
    build_index(root, cache_fallback=tmp_path / "run")
    assert not (root / ".ssl_sec_index.json").exists()
    assert len(list((tmp_path / "run").glob("index-*.json"))) == 1


# ----------------------------------------------------------------------------- bad files
def _bad_folder(tmp_path: Path) -> Path:
    good = _pattern(96, 64)
    root = _folder(tmp_path / "bad", {f"a/{i}.png": good for i in range(4)})
    _folder(root, {"a/empty.jpg": b"", "a/text.jpg": b"this is not an image",
                   "a/bomb.png": _bomb_png()})
    Image.fromarray(good).convert("L").save(root / "a" / "grey.png")
    Image.fromarray(good).convert("CMYK").save(root / "a" / "cmyk.jpg")
    Image.fromarray(good).convert("RGBA").save(root / "a" / "alpha.png")
    jpeg = root / "a" / "truncated.jpg"
    Image.fromarray(_pattern(320, 240)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:2000])  # the header survives, the pixels do not
    return root


def test_bad_files_stop_at_index_time_with_the_file_named(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(DataError) as err:
        build_index(root)
    message = str(err.value)
    assert "\n" not in message and "skip_bad_images" in message
    assert any(name in message for name in ("bomb.png", "empty.jpg", "text.jpg"))
    assert "2 more bad files" in message


def test_skip_bad_images_reports_each_once_and_converts_modes(tmp_path):
    root = _bad_folder(tmp_path)
    logged: list[str] = []
    index = build_index(root, skip_bad=True, log=logged.append)
    assert sorted(Path(p).name for p, _ in index.bad) == ["bomb.png", "empty.jpg", "text.jpg"]
    assert len(logged) == 3 and any("decompression bomb" in m for m in logged)
    assert any("empty file (0 bytes)" in m for m in logged)
    names = [Path(f).name for f in index.files]
    assert "truncated.jpg" in names  # its header is fine: it fails when decoded
    for mode_file in ("grey.png", "cmyk.jpg", "alpha.png"):
        crops = CropStream(index, 32, [((0.5, 1.0), (1.0, 1.0))], 0).crops(0, names.index(mode_file))
        assert crops[0].shape == (32, 32, 3)
    strict = StreamLoader(CropStream(index, 32, [((0.5, 1.0), (1.0, 1.0))] * 2, 0), 2,
                          torch.Generator().manual_seed(0), torch.device("cpu"), shuffle=False)
    with pytest.raises(DataError, match="truncated.jpg.*skip_bad_images"):
        list(strict)
    seen: list[str] = []
    lenient = StreamLoader(CropStream(index, 32, [((0.5, 1.0), (1.0, 1.0))] * 2, 0, skip_bad=True),
                           2, torch.Generator().manual_seed(0), torch.device("cpu"),
                           shuffle=False, log=seen.append)
    for _ in range(2):  # two epochs: reported once
        batches = list(lenient)
        assert len(batches) == len(index) // 2
        assert all(b[0].shape == (2, 3, 32, 32) and b[0].dtype == torch.uint8 for b in batches)
    assert len(seen) == 1 and "truncated.jpg" in seen[0]


def test_cli_bad_file_is_one_line_exit_2(tmp_path, capsys):
    root = _bad_folder(tmp_path)
    code = cli.main(["pretrain", "recipes/quickstart.yaml", "data.dataset=imagefolder",
                     f"data.root={root}", "data.mode=stream", f"out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad" in str(root) and str(root) in err[0]


# ----------------------------------------------------------------------------- loader
def test_ddp_shards_cover_each_sample_once_per_epoch():
    seen = []
    for rank in range(2):
        batches = _EpochBatches(103, 10, torch.Generator().manual_seed(4), (rank, 2), True)
        keys = [k for batch in batches for k in batch]
        assert all(len(b) == 5 for b in _EpochBatches(103, 10, torch.Generator().manual_seed(4),
                                                        (rank, 2), True))
        seen.append({i for _, i in keys})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100  # 3 dropped with the last batch


def test_same_batches_whichever_worker_reads_them(tmp_path):
    root = _folder(tmp_path / "f", {f"a/{i}.png": _pattern(80, 60) for i in range(8)})
    index = build_index(root)
    runs = []
    for workers in (0, 2):
        ds = CropStream(index, 24, [((0.2, 1.0), (3 / 4, 4 / 3))] * 2, seed=5)
        loader = StreamLoader(ds, 4, torch.Generator().manual_seed(1), torch.device("cpu"),
                              workers=workers)
        loader.set_epoch(3)
        runs.append([torch.cat(b[:2]) for b in loader])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory) -> Path:
    """The shared sample copied: streaming writes its index cache beside the data."""
    import shutil

    return Path(shutil.copytree(SAMPLE, tmp_path_factory.mktemp("sample") / "sample"))


def stream_args(root: Path) -> list[str]:
    return ["data.dataset=imagefolder", f"data.root={root}", "data.mode=stream",
            "data.workers=2", "augment.size=32", "data.test_subset=60", "eval.knn_k=10"]


def test_streamed_run_resumes_exactly(tmp_path, data_root, sample_copy):
    stream = stream_args(sample_copy)
    train(small_cfg(tmp_path, "name=a", *stream), progress_bar=False)
    train(small_cfg(tmp_path, "name=b", *stream), progress_bar=False, max_epochs=1)
    result = train(small_cfg(tmp_path, "name=b", *stream), progress_bar=False, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 2 * (128 // 32)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key, equal_nan=True)
    assert 0 <= result["top1"] <= 100


def test_auto_mode_picks_memory_or_stream_by_size(tmp_path, sample_copy):
    where = stream_args(sample_copy)[:2]
    cfg = from_dict({}, [*where, "data.mode=auto", "data.image_size=64"])
    assert load_splits(cfg.data).mode == "memory"
    cfg = from_dict({}, [*where, "data.mode=auto", "data.image_size=64",
                         "data.memory_budget_gb=0.001"])
    splits = load_splits(cfg.data)
    assert splits.mode == "stream" and "-> stream" in splits.note and "0.001" in splits.note
    assert len(splits.pretrain) == 300 and splits.pretrain is splits.bank


def test_stream_run_logs_progress_and_index(tmp_path, data_root, sample_copy):
    train(small_cfg(tmp_path, *stream_args(sample_copy), "optim.epochs=1"), progress_bar=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "knn" for r in rows)


def test_streamed_evaluation_never_decodes_the_set(tmp_path, data_root, sample_copy,
                                                     monkeypatch):
    """kNN, both linear-probe modes, few-shot and norms of a streamed checkpoint stream their
    images (the whole-set decoder is never called)."""
    from ssl_sec.data import registry
    from ssl_sec.evaluation.knn_command import knn_command
    from ssl_sec.evaluation.kshot import kshot_command
    from ssl_sec.evaluation.linear import linear_command
    from ssl_sec.evaluation.norms import norms_command

    train(small_cfg(tmp_path, *stream_args(sample_copy), "optim.epochs=1"), progress_bar=False)
    ckpt = tmp_path / "run" / "last.pt"

    def boom(*args, **kwargs):
        raise AssertionError("the streamed set was decoded into memory")

    monkeypatch.setattr(registry, "load_imagefolder", boom)
    knn = knn_command(ckpt, ["eval.knn_k=10"])
    # The bank: the run's 128 training images (SMALL's subset) of the sample's 300.
    assert knn["data_mode"] == "stream" and knn["n_train"] == 128 and knn["n_test"] == 60
    root = Path(__file__).resolve().parents[1]
    full = linear_command(ckpt, root / "recipes/linear/imagenet100.yaml",
                          ["optim.epochs=2", "data.test_subset=60"])
    fast = linear_command(ckpt, root / "recipes/linear/fast.yaml",
                          ["optim.epochs=2", "data.test_subset=60"])
    for result in (full, fast):
        assert result["data_mode"] == "stream" and result["backbone_unchanged"]
        assert 0 <= result["top1"] <= 100
    assert full["n_train"] == 300 and full["n_test"] == 60  # the probe: its recipe's data
    shots = kshot_command(ckpt, [1], 2, 0, None, "test", [])
    assert shots["n_images"] == 300
    norms = norms_command(ckpt, ["data.test_subset=40"])
    assert norms["n_images"] == 40 and norms["h"]["mean"] > 0


# ----------------------------------------------------------------------------- GPU decoding
def _jpeg_folder(tmp_path: Path) -> Path:
    root = _folder(tmp_path / "j", {f"a/{i}.jpg": _pattern(320 + 16 * i, 240) for i in range(5)},
                   fmt="JPEG")
    Image.fromarray(_pattern(200, 150)).save(root / "a" / "z.png")
    Image.fromarray(_pattern(200, 150)).convert("CMYK").save(root / "a" / "zz.jpg")
    return root


def test_bytes_stream_reads_bytes_and_the_same_boxes(tmp_path):
    """The worker half of data.decode=gpu, on the CPU: JPEG bytes untouched, the boxes the CPU
    path would cut; PNG and CMYK files decoded in the worker as the CPU path does."""
    from ssl_sec.data.stream import BytesStream

    index = build_index(_jpeg_folder(tmp_path))
    views = [((0.2, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (1.0, 1.0))]
    on_device, on_cpu = BytesStream(index, 48, views, 7), CropStream(index, 48, views, 7)
    for i, name in enumerate(index.files):
        kind, payload, boxes, label, skipped, error, path = on_device[(2, i)]
        assert error is None and label == 0 and path.endswith(name)
        if name.endswith(("z.png", "zz.jpg")):
            assert kind == "crops"
            cpu = torch.stack(on_cpu[(2, i)][0])
            assert torch.equal(payload, cpu)
            continue
        assert kind == "bytes" and payload.numpy().tobytes() == index.path(i).read_bytes()
        rng = np.random.default_rng((7, 2, i))
        width, height = index.sizes[i]
        want = [crop_box(rng, height, width, s, r) for s, r in views]
        assert boxes.tolist() == [list(b) for b in want]


def test_decoding_on_the_device_matches_the_workers(tmp_path):
    """decode_on_device with torchvision's JPEG decoder on the CPU (the GPU uses nvjpeg):
    the same crops as the worker path within decoder/resampling differences."""
    from ssl_sec.data.stream import BytesStream, decode_on_device

    index = build_index(_jpeg_folder(tmp_path))
    views = [((0.2, 1.0), (3 / 4, 4 / 3))] * 2
    keys = [(0, i) for i in range(len(index))]
    items = [BytesStream(index, 48, views, 1)[k] for k in keys]
    crops, labels, replaced = decode_on_device(items, 48, torch.device("cpu"), skip_bad=False)
    want = CropStream(index, 48, views, 1)
    assert crops[0].shape == (len(index), 3, 48, 48) and not replaced
    for i, key in enumerate(keys):
        ref = torch.stack(want[key][0])
        diff = (torch.stack([crops[0][i], crops[1][i]]).float() - ref.float()).abs().mean()
        assert diff < 4.0, (index.files[i], float(diff))


def test_a_jpeg_the_device_cannot_decode_is_named_or_replaced(tmp_path):
    from ssl_sec.data.stream import BytesStream, decode_on_device

    root = _jpeg_folder(tmp_path)
    bad = root / "a" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:700])
    index = build_index(root)  # the header survives
    items = [BytesStream(index, 32, [((0.5, 1.0), (1.0, 1.0))] * 2, 0)[(0, i)]
             for i in range(len(index))]
    with pytest.raises(DataError, match="3.jpg.*skip_bad_images"):
        decode_on_device(items, 32, torch.device("cpu"), skip_bad=False)
    crops, labels, replaced = decode_on_device(items, 32, torch.device("cpu"), skip_bad=True)
    assert crops[0].shape[0] == len(index) and len(replaced) == 1 and "3.jpg" in replaced[0]


def test_gpu_decode_without_a_gpu_is_a_one_line_error(tmp_path, capsys, sample_copy):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = cli.main(["pretrain", "recipes/quickstart.yaml", *stream_args(sample_copy),
                     "data.decode=gpu", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.decode=gpu needs a CUDA device" in err[0]
