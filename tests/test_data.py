"""fastcaps.tools.train.data: scikit-learn's digits, and MNIST IDX files the tests write themselves."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from fastcaps.tools.train.data import IDXError, load_mnist_idx, load_sklearn_digits, read_idx
from fastcaps.tools.train.smallnorb import (NORBError, SMALLNORB_FILES, centre_crop, load_smallnorb,
                                           norb_train_views, read_norb)


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, data: bytes, gzipped: bool = False) -> str:
    path = str(path) + (".gz" if gzipped else "")
    with open(path, "wb") as handle:
        handle.write(gzip.compress(data) if gzipped else data)
    return path


def _mnist_folder(folder, train=5, test=3, size=6, gzipped=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        _write(folder / f"{split}-images-idx3-ubyte", _idx_bytes(images), gzipped)
        _write(folder / f"{split}-labels-idx1-ubyte", _idx_bytes(labels), gzipped)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_idx_round_trip(tmp_path, gzipped):
    arrays = _mnist_folder(tmp_path, gzipped=gzipped)
    train, test = load_mnist_idx(str(tmp_path))
    for loaded, (images, labels) in ((train, arrays["train"]), (test, arrays["t10k"])):
        assert loaded.images.shape == (len(labels), 1, 6, 6) and loaded.images.dtype == torch.float32
        torch.testing.assert_close(loaded.images[:, 0], torch.from_numpy(images).float() / 255)
        assert loaded.labels.dtype == torch.int64 and loaded.labels.tolist() == labels.tolist()


def test_mnist_idx_accepts_dotted_names(tmp_path):
    images, labels = np.zeros((2, 4, 4), np.uint8), np.array([1, 2], np.uint8)
    for split in ("train", "t10k"):
        _write(tmp_path / f"{split}-images.idx3-ubyte", _idx_bytes(images))
        _write(tmp_path / f"{split}-labels.idx1-ubyte", _idx_bytes(labels))
    train, _ = load_mnist_idx(str(tmp_path))
    assert train.labels.tolist() == [1, 2]


def test_missing_file_is_named(tmp_path):
    _mnist_folder(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte not found.*does not download"):
        load_mnist_idx(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_mnist_idx(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("gzipped", [False, True])
def test_truncated_file(tmp_path, gzipped):
    data = _idx_bytes(np.zeros((4, 5, 5), np.uint8))
    path = _write(tmp_path / "images", data[:-7], gzipped)
    with pytest.raises(IDXError, match=r"truncated: the header gives shape \(4, 5, 5\), 116 bytes in all, "
                                       r"the file has 109"):
        read_idx(path, expected_dims=3)
    with pytest.raises(IDXError, match="truncated inside its header"):
        read_idx(_write(tmp_path / "header", data[:9]), expected_dims=3)
    with pytest.raises(IDXError, match="longer than its header says"):
        read_idx(_write(tmp_path / "long", data + b"\0"), expected_dims=3)


def test_damaged_gzip(tmp_path):
    packed = gzip.compress(_idx_bytes(np.zeros((4, 5, 5), np.uint8)))
    path = _write(tmp_path / "images.gz", packed[: len(packed) // 2])
    with pytest.raises(IDXError, match="damaged or truncated gzip"):
        read_idx(path)


def test_wrong_magic_type_and_swapped_files(tmp_path):
    with pytest.raises(IDXError, match="not an IDX file"):
        read_idx(_write(tmp_path / "png", b"\x89PNG\r\n\x1a\n" + bytes(20)))
    with pytest.raises(IDXError, match="holds float data; MNIST's IDX files hold unsigned bytes"):
        read_idx(_write(tmp_path / "float", _idx_bytes(np.zeros(3, np.uint8), type_code=0x0D)))
    labels = _write(tmp_path / "labels", _idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(IDXError, match="has 1 dimensions, expected images.*swapped"):
        read_idx(labels, expected_dims=3)


def test_mislabelled_splits(tmp_path):
    arrays = _mnist_folder(tmp_path)
    images, labels = arrays["train"]
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels[:-1]))
    with pytest.raises(IDXError, match="has 5 images but .*train-labels-idx1-ubyte has 4 labels"):
        load_mnist_idx(str(tmp_path))
    bad = labels.copy()
    bad[2] = 12
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(bad))
    with pytest.raises(IDXError, match="label 12 at index 2; labels must be in 0..9"):
        load_mnist_idx(str(tmp_path))


def test_sklearn_digits_split():
    train, test = load_sklearn_digits(seed=0)
    assert len(train.labels) + len(test.labels) == 1797 and 355 <= len(test.labels) <= 365
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.float32
    assert 0 <= float(train.images.min()) and float(train.images.max()) <= 1
    # MNIST-like framing: the digit lies in the central 20x20, the 4-pixel border is empty.
    assert float(train.images[..., :4, :].abs().sum()) == 0 and float(train.images[..., -4:].abs().sum()) == 0
    # Per-class split: every class keeps about a fifth of its digits in the test set.
    per_class = torch.bincount(test.labels, minlength=10).float() / torch.bincount(
        torch.cat([train.labels, test.labels]), minlength=10).float()
    assert float((per_class - 0.2).abs().max()) < 0.01
    again, _ = load_sklearn_digits(seed=0)
    other, _ = load_sklearn_digits(seed=1)
    assert torch.equal(again.labels, train.labels) and not torch.equal(other.labels, train.labels)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_sklearn_digits(test_fraction=1.0)



# --- smallNORB ----------------------------------------------------------------------------

def _norb_bytes(array: np.ndarray) -> bytes:
    magic = {np.dtype(np.uint8): 0x1E3D4C55, np.dtype(np.int32): 0x1E3D4C54}[array.dtype]
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = struct.pack("<ii", magic, array.ndim) + b"".join(struct.pack("<i", n) for n in dims)
    return header + array.tobytes()


def write_smallnorb(folder, count, gzipped=False, seed=0):
    """The six smallNORB files with ``count`` random entries per split (96 x 96 stereo pairs)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        pairs = rng.integers(0, 256, size=(count, 2, 96, 96), dtype=np.uint8)
        labels = rng.integers(0, 5, size=count).astype(np.int32)
        info = rng.integers(0, 9, size=(count, 4)).astype(np.int32)
        for kind, array in (("dat", pairs), ("cat", labels), ("info", info)):
            _write(os.path.join(folder, SMALLNORB_FILES[split].format(kind)), _norb_bytes(array), gzipped)
        arrays[split] = (pairs, labels)
    return arrays


@pytest.mark.parametrize("gzipped", [False, True])
def test_smallnorb_round_trip_and_preprocessing(tmp_path, gzipped):
    arrays = write_smallnorb(tmp_path, 6, gzipped)
    train, test = load_smallnorb(str(tmp_path), "both", split_size=6)
    assert train.images.shape == (6, 2, 48, 48) and train.images.dtype == torch.float32
    assert torch.equal(test.labels, torch.from_numpy(arrays["test"][1].astype(np.int64)))
    flat = train.images.reshape(12, -1)                # each camera's image on its own
    torch.testing.assert_close(flat.mean(1), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(12), atol=1e-5, rtol=0)
    left, _ = load_smallnorb(str(tmp_path), "left", split_size=6)
    # 96 -> 48 by 2 x 2 means, then standardised: the left camera is channel 0 of "both".
    pixels = torch.from_numpy(arrays["train"][0][:, :1].astype(np.float32) / 255)
    expected = torch.nn.functional.avg_pool2d(pixels, 2)
    expected = (expected - expected.mean((2, 3), keepdim=True)) / expected.std((2, 3), keepdim=True)
    torch.testing.assert_close(left.images, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left.images[:, 0], train.images[:, 0])
    generator = torch.Generator().manual_seed(0)
    views = norb_train_views(train.images, generator)
    assert views.shape == (6, 2, 32, 32) and not torch.equal(views, centre_crop(train.images))
    assert centre_crop(train.images).shape == (6, 2, 32, 32)
    torch.testing.assert_close(centre_crop(train.images), train.images[..., 8:40, 8:40])


def test_smallnorb_errors_name_the_file_and_the_problem(tmp_path):
    write_smallnorb(tmp_path, 4)
    with pytest.raises(NORBError, match="training-dat.mat: 4 entries; smallNORB's train split has 24300"):
        load_smallnorb(str(tmp_path))
    dat = tmp_path / SMALLNORB_FILES["test"].format("dat")
    data = dat.read_bytes()
    dat.write_bytes(data[:-10])
    with pytest.raises(NORBError, match="testing-dat.mat: truncated"):
        load_smallnorb(str(tmp_path), split_size=4)
    dat.write_bytes(b"\x00" * 64)
    with pytest.raises(NORBError, match="not a smallNORB matrix"):
        read_norb(str(dat))
    cat = tmp_path / SMALLNORB_FILES["train"].format("cat")
    cat.write_bytes(_norb_bytes(np.array([0, 1, 7, 2], dtype=np.int32)))
    dat.write_bytes(data)
    with pytest.raises(NORBError, match="category 7 at index 2"):
        load_smallnorb(str(tmp_path), split_size=4)
    info = tmp_path / SMALLNORB_FILES["test"].format("info")
    info.write_bytes(_norb_bytes(np.zeros((4, 3), dtype=np.int32)))
    cat.write_bytes(_norb_bytes(np.zeros(4, dtype=np.int32)))
    with pytest.raises(NORBError, match=r"testing-info.mat: holds int32 of shape \(4, 3\)"):
        load_smallnorb(str(tmp_path), split_size=4)
    os.remove(info)
    with pytest.raises(FileNotFoundError, match="testing-info.mat .* not found"):
        load_smallnorb(str(tmp_path), split_size=4)
    with pytest.raises(ValueError, match="camera must be one of"):
        load_smallnorb(str(tmp_path), "middle")
