"""CIFAR-10 readers: the official binary and python versions, from an archive, a folder or the web.

Every file is checked against the published md5 before it is parsed, so a truncated or corrupt
download fails with a message naming the file instead of yielding wrong images.

Layout of one binary record (``cifar-10-batches-bin``): 1 label byte, then 3072 pixel bytes:
1024 red, 1024 green, 1024 blue, each a 32x32 plane in row-major order. So a batch file of
10,000 records is 30,730,000 bytes, and ``records[:, 1:].reshape(n, 3, 32, 32)`` is NCHW.

Images are returned as ``uint8`` arrays of shape (N, 3, 32, 32) (NCHW, RGB), labels as ``int64``
(N,), in :class:`~netquant.data.imageset.ImageSet` values named by :data:`CLASSES`. Conversion
to float and normalisation belong to the network (see ``netquant.data.transforms``).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imageset import DataError, ImageSet, Splits

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

RECORD_BYTES = 1 + 3 * 32 * 32  # label byte + 3072 pixel bytes

# Published checksums of the members of the official archives (cs.toronto.edu/~kriz/cifar.html).
BINARY_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
PYTHON_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BINARY = [f"data_batch_{i}.bin" for i in range(1, 6)]
TRAIN_PYTHON = [f"data_batch_{i}" for i in range(1, 6)]
BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
DATA_ENV = "NETQUANT_DATA"


@dataclass(frozen=True, repr=False)
class Cifar10(Splits):
    """The two splits of CIFAR-10 and where they were read from."""

    def __repr__(self) -> str:
        return f"Cifar10(train={self.train!r}, test={self.test!r})"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def check_md5(name: str, data: bytes, expected: str, where: str) -> None:
    got = md5(data)
    if got != expected:
        raise DataError(
            f"{where}: {name} failed its checksum: md5 {got}, expected {expected} "
            f"({len(data)} bytes read); the file is truncated or corrupt, download it again")


def parse_binary_batch(data: bytes, name: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """Parse the bytes of one binary batch into (images uint8 NCHW, labels int64)."""
    if len(data) % RECORD_BYTES:
        raise DataError(f"{name}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise DataError(f"{name}: label {labels.max()} out of range 0..9")
    # (N, 3072) -> (N, 3, 32, 32): planes R, G, B, each row-major 32x32
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def encode_binary_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The inverse of :func:`parse_binary_batch`."""
    out = np.empty((len(images), RECORD_BYTES), dtype=np.uint8)
    out[:, 0] = labels
    out[:, 1:] = images.reshape(len(images), -1)
    return out.tobytes()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the python-version batches that refuses every global but numpy's arrays.

    Used only after the file's md5 matched the published checksum, as a second line of defence.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles carry bytes; harmless

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name} in a CIFAR-10 python batch")


def parse_python_batch(data: bytes, name: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """Parse one python-version batch (a pickled dict with b'data' (N, 3072) and b'labels')."""
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # a pickle that is not a CIFAR batch
        raise DataError(f"{name}: not a CIFAR-10 python batch ({e})") from e
    try:
        flat = np.asarray(d[b"data"])
        labels = np.asarray(d[b"labels"])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise DataError(f"{name}: expected a dict with keys b'data' and b'labels'") from e
    if flat.dtype != np.uint8 or flat.ndim != 2 or flat.shape[1] != 3 * 32 * 32:
        raise DataError(f"{name}: b'data' should be uint8 (N, 3072), got {flat.dtype} {flat.shape}")
    if labels.ndim != 1 or len(labels) != len(flat) or labels.dtype.kind not in "iu":
        raise DataError(f"{name}: b'labels' should be {len(flat)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{name}: label {labels.max() if labels.max() > 9 else labels.min()} out of range 0..9")
    # (N, 3072) -> (N, 3, 32, 32), the same plane order as the binary version
    return flat.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


class _Files:
    """Reads named members from a .tar.gz archive or a folder (searched recursively once)."""

    def __init__(self, path: Path):
        self.path = path
        self.members: dict[str, object] = {}
        if path.is_dir():
            try:
                for p in path.rglob("*"):
                    if p.is_file():
                        self.members.setdefault(p.name, p)
            except OSError as e:   # an unreadable sub-folder: say which, not a traceback
                raise DataError(f"{path}: cannot read the folder ({e})") from e
            self.tar = None
        else:
            try:
                self.tar = tarfile.open(path, "r:*")
                for m in self.tar.getmembers():
                    if m.isfile():
                        self.members.setdefault(os.path.basename(m.name), m)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: not a readable CIFAR-10 archive ({e})") from e

    def has(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str) -> bytes:
        m = self.members[name]
        if self.tar is None:
            try:
                return Path(m).read_bytes()
            except OSError as e:
                raise DataError(f"{m}: cannot read it ({e})") from e
        try:
            return self.tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{self.path}: member {name} could not be read, the archive is "
                            f"truncated or corrupt ({e})") from e


def _read_split(files: _Files, names: list[str], checksums: dict, parse, where: str):
    images, labels = [], []
    for name in names:
        data = files.read(name)
        check_md5(name, data, checksums[name], where)
        x, y = parse(data, name)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar10(path: str | os.PathLike) -> Cifar10:
    """Read CIFAR-10 from an official archive or folder, binary or python version.

    ``path`` is ``cifar-10-binary.tar.gz``, ``cifar-10-python.tar.gz``, or a folder holding the
    extracted batches. Each batch is checked against its published md5 before parsing.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected a CIFAR-10 archive or folder; "
                        f"set {DATA_ENV} or pass --data)")
    files = _Files(path)
    if all(files.has(n) for n in BINARY_MD5):
        kind, names, sums, parse = "binary", (TRAIN_BINARY, ["test_batch.bin"]), BINARY_MD5, parse_binary_batch
    elif all(files.has(n) for n in PYTHON_MD5):
        kind, names, sums, parse = "python", (TRAIN_PYTHON, ["test_batch"]), PYTHON_MD5, parse_python_batch
    else:
        missing = [n for n in BINARY_MD5 if not files.has(n)]
        raise DataError(f"{path}: not a CIFAR-10 binary or python dataset; missing {', '.join(missing)}")
    log.info("reading CIFAR-10 (%s version) from %s", kind, path)
    train = _read_split(files, names[0], sums, parse, str(path))
    test = _read_split(files, names[1], sums, parse, str(path))
    return Cifar10(ImageSet(*train, f"CIFAR-10 training set ({kind}, {path})", CLASSES),
                   ImageSet(*test, f"CIFAR-10 test set ({kind}, {path})", CLASSES))


# --- the embedded sample --------------------------------------------------------------------

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_FILES = {"train": "train_first1000.bin.gz", "test": "test_first1000.bin.gz"}


def read_sample() -> Cifar10:
    """The sample shipped inside the package: the first 1,000 training and 1,000 test images of
    the official binary batches, in official order (works offline, no dataset needed)."""
    sets = {}
    for split, name in SAMPLE_FILES.items():
        data = gzip.decompress((SAMPLE_DIR / name).read_bytes())
        images, labels = parse_binary_batch(data, name)
        sets[split] = ImageSet(images, labels, f"embedded sample: first {len(labels)} CIFAR-10 "
                                               f"{'training' if split == 'train' else 'test'} images", CLASSES)
    return Cifar10(sets["train"], sets["test"])


def write_sample(data: Cifar10, count: int = 1000, folder: Path = SAMPLE_DIR) -> None:
    """Write the embedded sample from the full dataset (a maintainer's step)."""
    for split, name in SAMPLE_FILES.items():
        s = getattr(data, split)
        raw = encode_binary_batch(s.images[:count], s.labels[:count])
        (folder / name).write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def download(cache: str | os.PathLike) -> Path:
    """Download the official binary archive into ``cache`` (if not there) and return its path."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "cifar-10-binary.tar.gz"
    if not target.exists():
        log.info("downloading %s to %s", BINARY_URL, target)
        part = target.with_suffix(".part")
        try:
            urllib.request.urlretrieve(BINARY_URL, part)
        except OSError as e:
            raise DataError(f"could not download CIFAR-10 from {BINARY_URL} ({e}); pass --data "
                            f"with a local copy or set {DATA_ENV}") from e
        part.rename(target)
    return target


def data_spec(data=None):
    """``data`` when given, else ``$NETQUANT_DATA``, else None; an empty value (``--data ""`` or
    ``NETQUANT_DATA=``) is an error, not the current folder (which would be walked recursively)."""
    if data is not None:
        if not str(data).strip():
            raise DataError("--data is empty: give a CIFAR-10 archive or folder, an image folder, a .zip, a .npz, "
                            "'sample' or 'download'")
        return data
    env = os.environ.get(DATA_ENV)
    if env is not None and not env.strip():
        raise DataError(f"{DATA_ENV} is set but empty: set it to a CIFAR-10 archive or folder, an image folder, a "
                        f".zip, a .npz, 'sample' or 'download', or unset it to use the embedded sample")
    return env


def load_cifar10(data: str | os.PathLike | None = None, allow_sample: bool = True) -> Cifar10:
    """Resolve where the data lives and read it.

    Order: the ``data`` argument; the ``NETQUANT_DATA`` environment variable; the word
    ``download`` in either (fetch into ``~/.cache/netquant``); otherwise the embedded sample
    (if ``allow_sample``). ``data="sample"`` asks for the embedded sample explicitly.
    """
    spec = data_spec(data)
    if spec is None or str(spec) == "sample":
        if spec is None and not allow_sample:
            raise DataError(f"no CIFAR-10 data given: pass --data PATH or set {DATA_ENV}")
        return read_sample()
    if str(spec) == "download":
        return read_cifar10(download(Path.home() / ".cache" / "netquant"))
    return read_cifar10(spec)
