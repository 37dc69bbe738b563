"""One family of errors for every failure a user can cause or fix.

Everything netquant raises on purpose for bad input, bad files or a missing tool is a
:class:`NetquantError`; the CLI prints its message as one line and exits with status 2. Any
other exception is a bug in netquant: the CLI prints its traceback and says so (status 1).

Classes that existed before this module keep their old base (``ValueError`` or
``RuntimeError``) as a second base, so ``except ValueError`` in user code still catches them.
This module imports nothing, so ``import netquant`` stays light.
"""
from __future__ import annotations


class NetquantError(Exception):
    """A failure the user can fix: the message names the file, layer or argument and what was
    expected, on one line."""


class NotFoundError(NetquantError, KeyError):
    """A name that is not there: a layer, node, session or statistic (also a KeyError). Printed
    as its message, without the quotes a KeyError adds."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingFileError(NetquantError, FileNotFoundError):
    """A file the user named does not exist (also a FileNotFoundError); the message names it."""


class StateError(NetquantError, ValueError):
    """A step asked for before the step it needs (quantize or validate before calibrate)."""


class ArgumentError(NetquantError, ValueError):
    """An argument (of a command or a public function) that cannot work."""


class OutputPathError(NetquantError, FileNotFoundError):
    """A file cannot be written where asked: its folder does not exist (also a FileNotFoundError)."""


class InputError(NetquantError, ValueError):
    """Images, labels or arrays given to the API that do not fit the network (shape, dtype,
    value range, count)."""


class DataError(NetquantError, ValueError):
    """A data set (CIFAR-10, an image folder, a zip, a .npz) that cannot be read as one."""


class ModelFileError(NetquantError, ValueError):
    """A model file or name that cannot be loaded."""


class QuantizerFileError(NetquantError, ValueError):
    """A quantizer or calibration file that is missing, corrupt, too large or inconsistent; the
    message names the file and the member (and the layer where there is one)."""


class MetricError(NetquantError, ValueError):
    """A metric that cannot be resolved, or that failed when called."""


class CompiledNetworkError(NetquantError, ValueError):
    """A call into a built library with arguments it cannot take (checked before the C runs)."""
