"""The static C of the generated sources: files of netquant/codegen/runtime (package data), read
at generation time. ``name.in`` files are templates whose ``${field}`` places take the network's
name and sizes (string.Template: ``$$`` is a literal $); the others are copied verbatim."""
from __future__ import annotations

import functools
import string
from importlib import resources


@functools.lru_cache(maxsize=None)
def runtime_text(name: str) -> str:
    """A file of netquant/codegen/runtime, read once."""
    return resources.files("netquant.codegen").joinpath("runtime", name).read_text(encoding="utf-8")


def fill(template: str, **values) -> str:
    """The runtime template ``template`` with ``values`` filled in; a missing value is an error
    (string.Template.substitute). Example: fill("c_amx.c.in", pad=4096, acc=256)."""
    return string.Template(runtime_text(template)).substitute(values)
