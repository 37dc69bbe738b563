"""CIFAR-10 readers, checksums, the embedded sample, subsets, augmentation and tiles (real data)."""
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from netquant.data import DataError, read_cifar10, read_sample, random_subset, tile
from netquant.data.cifar10 import (BINARY_MD5, RECORD_BYTES, encode_binary_batch, parse_binary_batch,
                                   parse_python_batch)
from netquant.data.transforms import batches, calibration_set, random_crop_flip, validation_set


@pytest.fixture(scope="module")
def binary_folder(cifar_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar-bin")
    with tarfile.open(cifar_path) as tar:
        tar.extractall(folder, filter="data")
    return next(folder.rglob("data_batch_1.bin")).parent


def test_real_dataset_shapes_and_classes(cifar):
    assert cifar.train.images.shape == (50000, 3, 32, 32)
    assert cifar.test.images.shape == (10000, 3, 32, 32)
    assert np.bincount(cifar.test.labels).tolist() == [1000] * 10
    assert np.bincount(cifar.train.labels).tolist() == [5000] * 10
    assert "training set (binary" in cifar.train.source
    assert cifar.test.class_names[3] == "cat" and cifar.train.class_name(9) == "truck"


def test_record_layout_is_label_then_rgb_planes(binary_folder, cifar):
    raw = (binary_folder / "data_batch_1.bin").read_bytes()
    record = np.frombuffer(raw[:RECORD_BYTES], np.uint8)
    assert cifar.train.labels[0] == record[0]
    # first pixel of the red plane, first of green (offset 1024), last of blue
    img = cifar.train.images[0]
    assert img[0, 0, 0] == record[1] and img[1, 0, 0] == record[1 + 1024] and img[2, 31, 31] == record[-1]


def test_folder_and_archive_read_identically(binary_folder, cifar):
    again = read_cifar10(binary_folder)
    assert np.array_equal(again.test.images, cifar.test.images)
    assert np.array_equal(again.train.labels, cifar.train.labels)


def test_python_format_reads_like_binary(binary_folder):
    """A python-format batch built from a real binary batch parses to the same arrays."""
    images, labels = parse_binary_batch((binary_folder / "test_batch.bin").read_bytes())
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels.tolist(),
             b"data": images.reshape(len(images), -1), b"filenames": [b"x.png"] * len(labels)}
    blob = pickle.dumps(batch, protocol=2)
    images2, labels2 = parse_python_batch(blob)
    assert np.array_equal(images, images2) and np.array_equal(labels, labels2)


def test_python_folder_with_wrong_checksum_is_refused_before_unpickling(binary_folder, tmp_path):
    images, labels = parse_binary_batch((binary_folder / "test_batch.bin").read_bytes())
    blob = pickle.dumps({b"labels": labels.tolist(), b"data": images.reshape(len(images), -1)})
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match=r"data_batch_1 failed its checksum: md5 \w+, expected c99cafc"):
        read_cifar10(tmp_path)


def test_unpickler_refuses_foreign_globals():
    evil = pickle.dumps({b"data": shutil.rmtree})  # a pickle that names a function
    with pytest.raises(DataError, match="refusing to unpickle shutil.rmtree"):
        parse_python_batch(evil)


def test_corrupt_file_names_file_and_expected_md5(binary_folder, tmp_path):
    for f in binary_folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    data = bytearray((tmp_path / "data_batch_3.bin").read_bytes())
    data[12345] ^= 1
    (tmp_path / "data_batch_3.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"data_batch_3.bin failed its checksum.*expected {BINARY_MD5['data_batch_3.bin']}"):
        read_cifar10(tmp_path)


def test_truncated_archive_gives_clear_error(cifar_path, tmp_path):
    cut = tmp_path / "cifar-10-binary.tar.gz"
    cut.write_bytes(cifar_path.read_bytes()[: 60_000_000])
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz"):
        read_cifar10(cut)


def test_truncated_batch_file_names_it(binary_folder, tmp_path):
    for f in binary_folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    p = tmp_path / "test_batch.bin"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"test_batch.bin failed its checksum.*\(30729900 bytes read\)"):
        read_cifar10(tmp_path)


def test_missing_files_are_listed(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(DataError, match="missing data_batch_2.bin"):
        read_cifar10(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_cifar10(tmp_path / "nothing-here.tar.gz")


def test_embedded_sample_is_first_1000_in_official_order(cifar):
    s = read_sample()
    assert np.array_equal(s.train.images, cifar.train.images[:1000])
    assert np.array_equal(s.test.labels, cifar.test.labels[:1000])
    assert "embedded sample" in s.test.source


def test_encode_parse_round_trip(cifar):
    raw = encode_binary_batch(cifar.test.images[:7], cifar.test.labels[:7])
    x, y = parse_binary_batch(raw)
    assert np.array_equal(x, cifar.test.images[:7]) and np.array_equal(y, cifar.test.labels[:7])


def test_subsets_are_reproducible(cifar):
    a = calibration_set(cifar)
    b = calibration_set(cifar)
    c = calibration_set(cifar, seed=1)
    assert len(a) == 200 and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.labels, c.labels)
    v = validation_set(cifar)
    assert len(v) == 50 and "50 random images (seed 0)" in v.source and "test set" in v.source
    assert validation_set(cifar, "all") is cifar.test
    with pytest.raises(ValueError, match="count must be in 1..10000"):
        random_subset(cifar.test, 10001)
    with pytest.raises(ValueError, match="'all'"):
        random_subset(cifar.test, "some")


def test_batches_scale_to_unit_range(cifar):
    got = list(batches(cifar.test.images[:250], 100))
    assert [s for s, _ in got] == [0, 100, 200] and got[-1][1].shape == (50, 3, 32, 32)
    assert got[0][1].dtype == np.float32 and got[0][1].max() <= 1.0
    assert got[0][1][0, 0, 0, 0] == np.float32(cifar.test.images[0, 0, 0, 0]) / np.float32(255)


def test_random_crop_flip_moves_and_mirrors(cifar):
    imgs = cifar.train.images[:64]
    out = random_crop_flip(imgs, np.random.default_rng(0))
    assert out.shape == imgs.shape and out.dtype == np.uint8
    # with zero padding the crops are shifted copies: each output matches its input somewhere
    out0 = random_crop_flip(imgs, np.random.default_rng(0), pad=0)
    for a, b in zip(out0, imgs):
        assert np.array_equal(a, b) or np.array_equal(a, b[:, :, ::-1])
    assert not np.array_equal(out0, imgs)  # some were flipped


def test_tile_geometry(cifar):
    t = tile(cifar.train.images[:20], columns=5, scale=2, border=2)
    assert t.shape == (266, 332, 3)
    assert np.array_equal(t[2:66, 2:66], cifar.train.images[0].transpose(1, 2, 0).repeat(2, 0).repeat(2, 1))
