"""What the app's requests carry, parsed and checked: uploaded model and data files (kind,
archive safety, a .npy of images), the input spec form, shapes, counts and names.

Every function raises :class:`HttpError` with the status and a message naming the field and what
was expected; nothing here touches a path the request chose, except to read an archive the
server itself wrote into a session folder.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from .. import fileio
from ..quant.config import image_count

MODEL_SUFFIXES = (".onnx", ".safetensors")
DATA_SUFFIXES = (".zip", ".npz")
MAX_MEMBERS = 200_000              # files in an uploaded zip


class HttpError(Exception):
    """A request the app refuses: ``status`` (400 bad input, 404, 409 not now, 413 too large)
    and a message the page shows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def safe_name(filename: str) -> str:
    """A display name from an uploaded file name: its last path part, odd characters replaced
    ("../My Net (v2).onnx" -> "My_Net__v2_"); never used as a path."""
    stem = Path(filename.replace("\\", "/").split("/")[-1]).stem
    return re.sub(r"[^\w.-]", "_", stem)[:64].strip(".")


def model_kind(filename: str, blob: bytes) -> str:
    """".onnx" or ".safetensors": from the upload's file name, else from its first bytes (a
    safetensors file starts with an 8-byte header length and "{")."""
    suffix = Path(filename).suffix.lower()
    if filename:
        if suffix not in MODEL_SUFFIXES:
            raise HttpError(400, f"upload {filename!r}: expected a {' or '.join(MODEL_SUFFIXES)} file")
        return suffix
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 9 else 0
    return ".safetensors" if 0 < n < len(blob) and blob[8:9] == b"{" else ".onnx"


def data_kind(filename: str, blob: bytes) -> str:
    """".zip" or ".npz": from the upload's file name, else ".npz" when every member is a .npy
    array (what numpy.savez writes)."""
    suffix = Path(filename).suffix.lower()
    if filename and suffix not in DATA_SUFFIXES:
        raise HttpError(400, f"upload {filename!r}: expected a .zip of an image folder or an .npz")
    if blob[:4] != b"PK\x03\x04":
        raise HttpError(400, f"upload {filename!r}: not a zip archive (expected a .zip of an image folder or an .npz)")
    if suffix:
        return suffix
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return ".npz" if all(n.endswith(".npy") for n in z.namelist()) else ".zip"
    except zipfile.BadZipFile as e:
        raise HttpError(400, f"upload: not a readable zip archive ({e})")


def check_archive(path: Path, limit: int, name: str) -> None:
    """Refuse an uploaded zip/npz that is broken, names files outside itself or expands past
    ``limit`` bytes (a zip bomb), before any reader opens it."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise HttpError(400, f"data set {name}: not a readable zip archive ({e})")
    total = sum(i.file_size for i in infos)
    if total > limit:
        raise HttpError(413, f"data set {name}: expands to {total} bytes, over the limit of {limit} bytes")
    if len(infos) > MAX_MEMBERS:
        raise HttpError(413, f"data set {name}: {len(infos)} files, over the limit of {MAX_MEMBERS}")
    for i in infos:
        parts = i.filename.replace("\\", "/").split("/")
        if i.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise HttpError(400, f"data set {name}: unsafe member name {i.filename!r}")


def shape_arg(v) -> Optional[tuple]:
    """"3,224,224" or [3, 224, 224] -> (3, 224, 224); empty -> None."""
    if v in (None, "", []):
        return None
    items = v.replace("x", ",").split(",") if isinstance(v, str) else v
    try:
        shape = tuple(int(str(x).strip()) for x in items)
    except (TypeError, ValueError):
        raise HttpError(400, f"input_shape {v!r}: expected C,H,W as positive integers")
    if len(shape) != 3 or min(shape) <= 0:
        raise HttpError(400, f"input_shape {v!r}: expected C,H,W as positive integers")
    return shape


def parse_numbers(v, what: str) -> Optional[tuple]:
    if v in (None, "", []):
        return None
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise HttpError(400, f"input spec {what}: expected numbers separated by commas, got {v!r}")
    try:
        out = tuple(float(str(x).strip()) for x in items)
    except ValueError:
        raise HttpError(400, f"input spec {what}: expected numbers separated by commas, got {v!r}")
    if not all(np.isfinite(out)):
        raise HttpError(400, f"input spec {what}: expected finite numbers, got {v!r}")
    return out


SPEC_KEYS = ("channel_order", "value_range", "mean", "std")


def spec_fields(v) -> Optional[dict]:
    """The input spec the page sent (an object or its JSON text), checked and parsed; None when
    there is none (the network takes [0, 1] RGB images as they are)."""
    if v in (None, "", {}):
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise HttpError(400, f"input_spec: not JSON ({e})")
    if not isinstance(v, dict):
        raise HttpError(400, f"input_spec: expected an object with {', '.join(SPEC_KEYS)}, got {type(v).__name__}")
    unknown = set(v) - set(SPEC_KEYS)
    if unknown:
        raise HttpError(400, f"input_spec: unknown field(s) {sorted(unknown)}; expected {', '.join(SPEC_KEYS)}")
    out = {"channel_order": str(v.get("channel_order") or "RGB").upper(),
           "value_range": parse_numbers(v.get("value_range"), "value_range") or (0.0, 1.0),
           "mean": parse_numbers(v.get("mean"), "mean"), "std": parse_numbers(v.get("std"), "std")}
    if len(out["value_range"]) != 2:
        raise HttpError(400, f"input spec value_range: expected two numbers (low, high), got {v.get('value_range')!r}")
    return out


def make_input_spec(fields: dict, shape):
    from ..ir.input_spec import InputSpec

    try:
        return InputSpec(shape=tuple(shape), **fields)
    except (TypeError, ValueError) as e:
        raise HttpError(400, f"input spec: {e}")


def parse_class_names(v) -> Optional[tuple]:
    if v in (None, "", []):
        return None
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise HttpError(400, f"class_names: expected a list or comma-separated text, got {v!r}")
    names = tuple(str(x).strip() for x in items)
    if not all(names) or len(set(names)) != len(names):
        raise HttpError(400, f"class_names: expected distinct, non-empty names, got {list(names)}")
    return names


def to_int(v, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise HttpError(400, f"{what} must be an integer, got {v!r}")


def parse_count(v):
    try:
        return image_count(v)
    except ValueError as e:
        raise HttpError(400, str(e)) from None


def _check_npy_header(blob: bytes) -> None:
    """Read the .npy header alone and refuse an array the bytes cannot hold, before numpy
    allocates it: e.g. a header declaring (2**40, 3, 32, 32) uint8 (3 PiB) on 12 KB of data is a
    400, not a MemoryError (numpy allocates the declared array, then reads into it)."""
    f = io.BytesIO(blob)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version[0]}.{version[1]} (netquant reads 1.0 and 2.0)")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:   # numpy parses the header with tokenize/ast: TokenError, SyntaxError, ...
        raise HttpError(400, f"upload: not a .npy array ({type(e).__name__}: {e})")
    if dtype.hasobject:
        raise HttpError(400, "upload: a .npy of Python objects; expected uint8 or float images")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = len(blob) - f.tell()
    if declared > held:
        raise HttpError(400, f"upload: the .npy header declares {shape} {dtype} ({declared:,} bytes) "
                             f"but the file holds {held:,} bytes of data")


def load_npy(blob: bytes, folder: Path, shape: tuple) -> np.ndarray:
    """An uploaded .npy array of images (N, C, H, W) of the network's input shape, uint8 or float
    in [0, 1]; parsed without pickle, stored in the session folder under a fixed name."""
    path = folder / "calibration-upload.npy"
    fileio.write_bytes(path, blob)
    _check_npy_header(blob)
    try:
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise HttpError(400, f"upload: not a .npy array ({e})")
    want = "(N, " + ", ".join(map(str, shape)) + ")"
    if not isinstance(arr, np.ndarray) or arr.ndim != len(shape) + 1 or arr.shape[1:] != tuple(shape) or len(arr) == 0:
        raise HttpError(400, f"upload: expected images of shape {want}, got {getattr(arr, 'shape', arr)}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise HttpError(400, f"upload: expected uint8 or float images, got {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise HttpError(400, "upload: images hold NaN or inf values")
    return arr
