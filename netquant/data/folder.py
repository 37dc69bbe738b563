"""Your own images: image folders (one sub-folder per class), zips of them, ``.npz`` arrays, and
:func:`open_data`, which resolves every ``--data`` argument.

An image folder is laid out as torchvision's ``ImageFolder`` and ImageNet expect::

    val/cat/0001.png  val/cat/0002.jpg  val/dog/0003.png ...

Class numbers are the sorted sub-folder names (``cat`` = 0, ``dog`` = 1), or the positions in a
given ``class_names`` list (the model's class order). Images are PNG or JPEG, converted to RGB as
torchvision's loader does (grey, palette and RGBA images; the alpha channel is dropped); 16-bit
PNGs keep their top 8 bits rounded (v * 255 / 65535). Nothing is skipped silently: an unreadable
image is an error naming the file, an empty class folder is an error, and files that are not
images are counted in the provenance line.

A ``.zip`` holds such a folder (optionally inside one top folder); its members are read in memory,
never extracted, and a member whose name leaves the folder (``../x``, ``/etc/x``), a link, an
encrypted member, or sizes past the limits below refuse the whole archive.

A ``.npz`` holds ``images`` uint8 (N, H, W, C) or (N, C, H, W), ``labels`` integers (N,) and,
optionally, ``class_names`` (strings); it is read with ``allow_pickle=False``.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ArgumentError
from .imageset import DataError, ImageSet, Splits, _check_size, describe_resize, resize_crop, resize_crop_array

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Limits on a .zip, so that a hostile archive cannot exhaust memory or time: members are read one
# at a time into memory, so these bound the work, not the result (the decoded images).
ZIP_MAX_MEMBERS = 2_000_000
ZIP_MAX_MEMBER_BYTES = 256 << 20     # one image file, uncompressed
ZIP_MAX_TOTAL_BYTES = 16 << 30       # all members, uncompressed (larger: extract it, pass the folder)
SPLIT_TRAIN = "train"
SPLIT_TEST = ("val", "test")          # the first present is the validation split
DECODE_THREADS = 8                    # Pillow decodes and resizes without the GIL


# --- where the files are: a folder or a zip ----------------------------------------------------

class _Tree:
    """The files of an image folder or a zip, by relative POSIX path (hidden ones apart)."""

    def __init__(self, path: Path):
        self.path = path
        self.hidden = 0            # dot files and __MACOSX entries, never read
        self.files: dict[str, object] = {}
        self._zip: Optional[zipfile.ZipFile] = None
        self._lock = threading.Lock()   # ZipFile reads share one file handle
        self._groups: dict = {}         # prefix -> (loose files, {sub-folder: files})
        if path.is_dir():
            self.kind = "image folder"
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs.sort()
                rel_root = Path(root).relative_to(path)
                for name in sorted(names):
                    rel = (rel_root / name).as_posix()
                    if _hidden(rel):
                        self.hidden += 1
                    else:
                        self.files[rel] = Path(root) / name
        else:
            self.kind = "zip"
            self._open_zip(path)

    def _open_zip(self, path: Path) -> None:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path}: not a readable zip file ({e})") from e
        infos = zf.infolist()
        if len(infos) > ZIP_MAX_MEMBERS:
            raise DataError(f"{path}: {len(infos):,} members, more than the limit of {ZIP_MAX_MEMBERS:,}; "
                            f"extract it and pass the folder")
        total = 0
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name).parts
            if (name.startswith(("/", "\\")) or "\\" in name or ".." in parts
                    or (parts and len(parts[0]) >= 2 and parts[0][1] == ":")):
                raise DataError(f"{path}: member {name!r} would land outside the folder (path traversal); "
                                f"refusing the archive")
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{path}: member {name!r} is a symbolic link; refusing the archive")
            if info.flag_bits & 0x1:
                raise DataError(f"{path}: member {name!r} is encrypted; netquant reads unencrypted zips only")
            if info.file_size > ZIP_MAX_MEMBER_BYTES:
                raise DataError(f"{path}: member {name!r} is {info.file_size:,} bytes uncompressed, more than "
                                f"the limit of {ZIP_MAX_MEMBER_BYTES:,}")
            total += info.file_size
            if total > ZIP_MAX_TOTAL_BYTES:
                raise DataError(f"{path}: more than {ZIP_MAX_TOTAL_BYTES:,} bytes uncompressed; extract it and "
                                f"pass the folder")
            rel = PurePosixPath(*parts).as_posix()
            if _hidden(rel):
                self.hidden += 1
            else:
                self.files[rel] = info
        self._zip = zf

    def read(self, rel: str) -> bytes:
        m = self.files[rel]
        if self._zip is None:
            return Path(m).read_bytes()
        with self._lock:
            try:
                # ZipExtFile stops at the declared size and checks the CRC, so a member that
                # inflates past its header (a zip bomb) fails here instead of filling memory
                with self._zip.open(m) as f:
                    return f.read()
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise DataError(f"{self.path}: member {rel} could not be read ({e})") from e

    def where(self, prefix: str) -> str:
        """``image folder /x/val`` or ``zip /x/a.zip, folder val``."""
        if self._zip is None:
            return f"{self.kind} {self.path / prefix if prefix else self.path}"
        return f"zip {self.path}" + (f", folder {prefix}" if prefix else "")

    def _group(self, prefix: str) -> tuple:
        """(files directly under ``prefix``, {sub-folder: its files, sorted}); '' = the top.
        One pass over the files per folder asked about (ImageNet: 1.3M files, 1,000 classes)."""
        if prefix not in self._groups:
            start = prefix + "/" if prefix else ""
            loose, subs = [], {}
            for rel in self.files:
                if rel.startswith(start):
                    head, sep, _ = rel[len(start):].partition("/")
                    if sep:
                        subs.setdefault(head, []).append(rel)
                    else:
                        loose.append(rel)
            self._groups[prefix] = (sorted(loose), {k: sorted(v) for k, v in subs.items()})
        return self._groups[prefix]

    def subdirs(self, prefix: str) -> list:
        """Sorted names of the folders directly under ``prefix`` that hold files."""
        return sorted(self._group(prefix)[1])

    def loose(self, prefix: str) -> list:
        """Files directly under ``prefix``."""
        return self._group(prefix)[0]

    def under(self, prefix: str, sub: str) -> list:
        """Every file below the folder ``prefix/sub``, sorted."""
        return self._group(prefix)[1][sub]

    def root(self) -> str:
        """Where the image folder starts: the top, or, in a zip of a folder (one top folder of
        folders and no loose images: ``images/cat/1.png``), that folder."""
        prefix = ""
        while self._zip is not None and self.splits(prefix) is None:
            subs = self.subdirs(prefix)
            if len(subs) != 1 or any(_is_image(r) for r in self.loose(prefix)):
                break
            inner = f"{prefix}/{subs[0]}" if prefix else subs[0]
            if not self.subdirs(inner):   # the one folder holds the images: it is the one class
                break
            prefix = inner
        return prefix

    def splits(self, prefix: str) -> Optional[tuple]:
        """(train folder, validation folder) when ``prefix`` holds ``train/`` and ``val/`` (or
        ``test/``), else None."""
        subs = self.subdirs(prefix)
        test = next((s for s in SPLIT_TEST if s in subs), None)
        if SPLIT_TRAIN in subs and test is not None:
            join = (lambda s: f"{prefix}/{s}") if prefix else (lambda s: s)
            return join(SPLIT_TRAIN), join(test)
        return None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_SUFFIXES)


# --- decoding -----------------------------------------------------------------------------------

def _decode(data: bytes, name: str, channels: int, size, resize) -> tuple:
    """One image file -> (uint8 (C, H, W), RGB (or grey for ``channels=1``), resized to ``size``
    when given; whether it was resized)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in ("PNG", "JPEG"):
            raise DataError(f"{name}: a {img.format} image; expected PNG or JPEG")
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit grey: PIL's convert("L") clips instead of scaling, so scale in numpy
            v = np.asarray(img).astype(np.int64)
            if v.min() < 0 or v.max() > 65535:
                raise DataError(f"{name}: {img.mode} pixel values outside 0..65535")
            img = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")
        img = img.convert("L" if channels == 1 else "RGB")
        resized = size is not None and (resize is not None or (img.height, img.width) != tuple(size))
        if resized:
            img = resize_crop(img, size, resize)
        arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: not a readable PNG or JPEG image ({e})") from e
    return (arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))), resized


def _read_classes(tree: _Tree, prefix: str, class_names, channels, size, resize,
                  progress) -> ImageSet:
    where = tree.where(prefix)
    subs = tree.subdirs(prefix)
    loose = tree.loose(prefix)
    loose_images = [r for r in loose if _is_image(r)]
    if loose_images:
        raise DataError(f"{where}: image files directly in the folder (e.g. {PurePosixPath(loose_images[0]).name}); "
                        f"expected one sub-folder per class (ImageNet style: val/cat/1.png, val/dog/2.png)")
    if not subs:
        raise DataError(f"{where}: no class sub-folders with images (expected one sub-folder per class, "
                        f"ImageNet style: val/cat/1.png, val/dog/2.png)")
    if class_names is None:
        names = tuple(subs)
    else:
        names = tuple(str(c) for c in class_names)
        if len(set(names)) != len(names):
            raise DataError(f"class_names: names repeat ({len(names)} given, {len(set(names))} distinct)")
        unknown = [s for s in subs if s not in names]
        if unknown:
            raise DataError(f"{where}: class folder(s) {', '.join(unknown[:5])} not among the {len(names)} class "
                            f"names given ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    index = {n: i for i, n in enumerate(names)}
    files, labels, other = [], [], len(loose)
    for sub in subs:
        folder = f"{prefix}/{sub}" if prefix else sub
        inside = tree.under(prefix, sub)
        images = [r for r in inside if _is_image(r)]
        other += len(inside) - len(images)
        if not images:
            raise DataError(f"{tree.where(folder)}: class folder {sub!r} holds no PNG or JPEG images"
                            + (f" ({len(inside)} other files)" if inside else ""))
        files += images
        labels += [index[sub]] * len(images)
    decoded = _decode_all(tree, files, channels, size, resize, progress)
    arrays, resized = [a for a, _ in decoded], sum(r for _, r in decoded)
    if size is None:
        first = arrays[0].shape
        for rel, a in zip(files, arrays):
            if a.shape != first:
                raise DataError(f"{where}: images differ in size: {files[0]} is {first[1]}x{first[2]}, {rel} is "
                                f"{a.shape[1]}x{a.shape[2]}; pass size=(H, W) (the CLI uses the model's input size)")
    parts = [f"{where}: {len(files)} images, {len(subs)} classes"]
    if class_names is not None and len(names) != len(subs):
        parts[0] += f" of {len(names)}"
    if resized:
        parts.append(("" if resized == len(files) else f"{resized} of them ") + describe_resize(size, resize))
    if other:
        parts.append(f"{other} other files ignored")
    if tree.hidden:
        parts.append(f"{tree.hidden} hidden files ignored")
    source = ", ".join(parts)
    log.info("%s", source)
    return ImageSet(np.stack(arrays), np.asarray(labels, np.int64), source, names)


def _decode_all(tree: _Tree, files: list, channels, size, resize, progress) -> list:
    from ..progress import report

    def one(rel):
        return _decode(tree.read(rel), f"{tree.where('')}: {rel}" if tree.kind == "zip" else str(tree.files[rel]),
                       channels, size, resize)

    out = []
    workers = max(1, min(DECODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for i, a in enumerate(pool.map(one, files)):   # in order; the first failure is raised
            out.append(a)
            if (i + 1) % 256 == 0 or i + 1 == len(files):
                report(progress, i + 1, len(files), "reading images")
    return out


# --- .npz -----------------------------------------------------------------------------------------

# An .npz member may inflate to NPZ_MEMBER_FLOOR bytes, or NPZ_MEMBER_RATIO times the file's size
# when that is more (images compress about 2:1; a 1000:1 member is a zip bomb), and its array
# must fit in the bytes the member holds: both checked before anything is inflated or allocated.
NPZ_MEMBER_FLOOR, NPZ_MEMBER_RATIO = 1 << 30, 50


def _check_npz_sizes(path: Path) -> None:
    """Refuse an .npz whose members inflate past the limits, or whose .npy headers declare arrays
    larger than the member (a 3 GB shape on 12 KB of data), before numpy allocates them."""
    try:
        limit = max(NPZ_MEMBER_FLOOR, NPZ_MEMBER_RATIO * path.stat().st_size)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.file_size > limit:
                    raise DataError(f"{path}: member {info.filename} inflates to {info.file_size:,} bytes, more than "
                                    f"the {limit:,} allowed for this file (a zip bomb?)")
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
                    else:
                        continue   # numpy reads other versions itself; its own checks apply
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > info.file_size:
                    raise DataError(f"{path}: member {info.filename} declares a {dtype} array of shape {shape} "
                                    f"({nbytes:,} bytes) but holds {info.file_size:,} bytes")
    except DataError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error, RuntimeError, NotImplementedError,
            SyntaxError, TypeError) as e:   # a corrupt header: numpy's parser raises several kinds
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


def _read_npz(path: Path, class_names, size, resize) -> ImageSet:
    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            missing = [k for k in ("images", "labels") if k not in keys]
            if missing:
                raise DataError(f"{path}: expected arrays 'images' and 'labels' (optional 'class_names'); "
                                f"found {', '.join(keys) or 'none'}")
            images, labels = z["images"], z["labels"]
            names = z["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except ValueError as e:   # object arrays need pickle, which is never used on data files
        raise DataError(f"{path}: cannot be read without unpickling ({e}); store plain uint8/int arrays") from e
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images: expected dtype uint8 (pixels 0..255), got {images.dtype}")
    if images.ndim == 3:                       # (N, H, W) grey
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{path}: images: expected (N, H, W, C) or (N, C, H, W), got shape {images.shape}")
    ch_first, ch_last = images.shape[1] <= 4, images.shape[3] <= 4
    if ch_first == ch_last:
        raise DataError(f"{path}: images: shape {images.shape} is ambiguous; expected the channels (at most 4) "
                        f"on axis 1 (N, C, H, W) or axis 3 (N, H, W, C)")
    layout = "NCHW" if ch_first else "NHWC"
    if ch_last:
        images = images.transpose(0, 3, 1, 2)   # (N, H, W, C) -> (N, C, H, W)
    images = np.ascontiguousarray(images)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels: expected {len(images)} integers, got {labels.dtype} {labels.shape}")
    if names is None:
        names = class_names
    else:
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise DataError(f"{path}: class_names: expected a 1-D array of strings, got {names.dtype} {names.shape}")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
        if class_names is not None and tuple(class_names) != names:
            raise DataError(f"{path}: its class_names differ from the ones given")
    if len(labels) and (labels.min() < 0 or (names is not None and labels.max() >= len(names))):
        raise DataError(f"{path}: labels: expected 0..{len(names) - 1 if names is not None else 'N'}, "
                        f"got {labels.min()}..{labels.max()}")
    source = f"npz {path}: {len(images)} images ({layout}), {len(np.unique(labels))} classes"
    if names is not None:
        source += f" of {len(names)}" if len(names) != len(np.unique(labels)) else ""
    if (size is not None and images.shape[2:] != tuple(size)) or resize is not None:
        images = np.stack([resize_crop_array(a, size, resize) for a in images])
        source += f", {describe_resize(size, resize)}"
    return ImageSet(images, labels.astype(np.int64), source, names)


# --- public -------------------------------------------------------------------------------------

def load_images(path, *, size: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None,
                resize: Optional[int] = None, channels: int = 3,
                progress: Optional[Callable] = None) -> ImageSet:
    """Labelled images from an image folder, a ``.zip`` of one, or a ``.npz`` (module docstring).

    ``size`` = (H, W): each image is resized (bilinear) and centre-cropped to it, torchvision's
    ``Resize`` + ``CenterCrop``: with ``resize`` (e.g. 256 for a 224 crop, the ImageNet habit) the
    shorter side becomes ``resize``; without it, the smallest scaling that covers (H, W) (a 500x375
    photo for 224x224: 298x224, then columns 37..260). ``class_names``: the class order of the
    model (sub-folder ``cat`` gets label ``class_names.index("cat")``); default the sorted
    sub-folder names. ``channels``: 3 (RGB) or 1 (grey) for image files.
    """
    path = Path(path)
    if size is not None:
        size = _check_size(size)
    if resize is not None and size is None:
        raise ArgumentError("resize: needs size=(H, W), the centre crop after it")
    if channels not in (1, 3):
        raise ArgumentError(f"channels: expected 1 (grey) or 3 (RGB), got {channels}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected an image folder, a .zip of one, or a .npz)")
    if path.suffix.lower() == ".npz":
        return _read_npz(path, class_names, size, resize)
    if not path.is_dir() and path.suffix.lower() != ".zip":
        raise DataError(f"{path}: expected an image folder, a .zip of one, or a .npz")
    tree = _Tree(path)
    try:
        prefix = tree.root()
        split = tree.splits(prefix)
        if split is not None:
            raise DataError(f"{tree.where(prefix)}: holds {split[0]}/ and {split[1]}/ splits, not classes; "
                            f"use open_data() (the CLI's --data does) or point at one split")
        return _read_classes(tree, prefix, class_names, channels, size, resize, progress)
    finally:
        tree.close()


def _is_cifar_folder(path: Path) -> bool:
    from .cifar10 import BINARY_MD5, PYTHON_MD5

    # the official archives extract to cifar-10-batches-bin/ or cifar-10-batches-py/, so look
    # one level down too (only for the first batch: a whole ImageNet folder is not walked)
    if any((path / n).is_file() for n in [*BINARY_MD5, *PYTHON_MD5]):
        return True
    return any((d / n).is_file() for d in path.iterdir() if d.is_dir() for n in ("data_batch_1.bin", "data_batch_1"))


def open_data(path=None, *, size: Optional[Sequence[int]] = None, resize: Optional[int] = None,
              class_names: Optional[Sequence[str]] = None, channels: int = 3,
              progress: Optional[Callable] = None):
    """The data behind a ``--data`` argument, as an object with ``.train`` and ``.test`` sets.

    ``path``: ``None`` (then ``$NETQUANT_DATA``, else the embedded CIFAR-10 sample), ``sample``,
    ``download``, a CIFAR-10 archive or extracted folder (a :class:`~netquant.data.Cifar10`), a
    folder or ``.zip`` with ``train/`` and ``val/`` (or ``test/``) image folders (train draws the
    calibration images, val the validation ones; val's labels follow train's classes), or one image
    folder, ``.zip`` or ``.npz`` (then ``train`` and ``test`` are that one set). ``size``,
    ``resize``, ``class_names`` and ``channels`` as in :func:`load_images`; CIFAR-10 is resized
    only when ``size`` differs from 32x32.
    """
    from .cifar10 import DATA_ENV, data_spec, load_cifar10, read_cifar10

    spec = data_spec(path)
    if size is not None:
        size = _check_size(size)
    kw = dict(size=size, resize=resize, channels=channels, progress=progress)
    if spec is None or str(spec) in ("sample", "download"):
        return _cifar_resized(load_cifar10(spec), size, resize)
    p = Path(spec)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder (expected a CIFAR-10 archive or folder, an image folder, a "
                        f".zip of one, a .npz, 'sample' or 'download'; set {DATA_ENV} or pass --data)")
    if p.is_dir() and _is_cifar_folder(p):
        return _cifar_resized(read_cifar10(p), size, resize)
    if p.suffix.lower() == ".npz":
        one = load_images(p, class_names=class_names, **kw)
        return Splits(one, one)
    if p.is_dir() or p.suffix.lower() == ".zip":
        tree = _Tree(p)
        try:
            prefix = tree.root()
            split = tree.splits(prefix)
            if split is None:
                one = _read_classes(tree, prefix, class_names, channels, size, resize, progress)
                return Splits(one, one)
            train = _read_classes(tree, split[0], class_names, channels, size, resize, progress)
            test = _read_classes(tree, split[1], train.class_names, channels, size, resize, progress)
            return Splits(train, test)
        finally:
            tree.close()
    return _cifar_resized(read_cifar10(p), size, resize)


def reads_image_files(path=None) -> bool:
    """True when :func:`open_data` would decode image files for ``path`` (an image folder or a
    zip), which it resizes as it decodes them; False for CIFAR-10 and .npz (arrays)."""
    from .cifar10 import data_spec

    spec = data_spec(path)
    if spec is None or str(spec) in ("sample", "download"):
        return False
    p = Path(spec)
    if p.is_dir():
        return not _is_cifar_folder(p)
    return p.suffix.lower() == ".zip"


def _cifar_resized(data, size, resize):
    return data if size is None else data.resized(size, resize)
