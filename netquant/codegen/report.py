"""The code generation report: one self-contained HTML page (no scripts, no external assets).

Per layer: its kernel, integer types, weight bytes and output buffer bytes (and arena offset);
the layers that run in float (or from a lookup table), how and why; the generated files with line
counts; the compiler command, time and warnings.
"""
from __future__ import annotations

import html

from .. import __version__


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _arm_notes(gen) -> str:
    """The Arm features and board build of an aarch64 build (arm_neon.board_notes); else nothing."""
    if not getattr(gen, "cross", None):
        return ""
    from .arm_neon import board_notes

    return board_notes(gen)


def _device_kernels(kernels) -> str:
    """ptxas's resources of each CUDA kernel (build.py, cuda.ptxas_resources); "" for other targets."""
    if not kernels:
        return ""
    spills = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    rows = [[k["kernel"], k["arch"], k["registers"], k["stack"], k["spill_stores"], k["spill_loads"]] for k in kernels]
    return (f"<h3>Device kernels (ptxas)</h3><p>{len(kernels)} kernels x architectures; "
            f"{'none spills registers' if not spills else f'{len(spills)} spill registers to local memory'}.</p>"
            + _table(["Kernel", "Architecture", "Registers", "Stack frame bytes", "Spill store bytes", "Spill load bytes"],
                     rows))


def render(gen) -> str:
    p = gen.program
    rows = []
    for s in p.steps:
        out = p.buffer(s.output)
        wbytes = gen.layer_bytes.get(s.node.name, 0)
        place = "caller's array" if out.offset < 0 else f"arena +{out.offset}"
        rows.append([s.node.name, "+".join(s.node.layers), gen.kernels.get(s.node.name, f"{gen.target}:{s.kind}"), out.dtype,
                     "x".join(map(str, out.shape)), wbytes, out.nbytes, place])
    layers = _table(["Layer", "Network layers", "Kernel", "Output type", "Output shape", "Constant bytes",
                     "Buffer bytes", "Placement"], rows)
    float_rows = [[s.node.name, "+".join(s.node.layers), gen.kernels.get(s.node.name, s.kind),
                   s.node.reason or "kept in floating point"] for s in p.float_steps()]
    floats = (_table(["Layer", "Network layers", "How it runs", "Why it is not int8"], float_rows) if float_rows
              else "<p>None: every layer runs in integers.</p>")
    sizes = getattr(gen, "sizes", {}) or {}
    files = _table(["File", "Lines", "Bytes"], [(f, n, f"{sizes.get(f, 0):,}") for f, n in sorted(gen.files.items())])
    b = gen.build
    build = ("<p>Not built yet.</p>" if not b else
             f"<p>Command: <code>{html.escape(b['command'])}</code><br>Time: {b['seconds']} s"
             f"{' (cached)' if b.get('cached') else ''}<br>Library: <code>{html.escape(b['library'])}</code></p>"
             f"<h3>Compiler warnings</h3><pre>{html.escape(b['warnings'] or 'none')}</pre>"
             + _device_kernels(b.get("device_kernels")))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>netquant code generation report: {html.escape(p.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }}
th {{ background: #f0f0f0; }}
code, pre {{ background: #f7f7f7; padding: 2px 4px; }}
</style></head><body>
<h1>Code generation report: {html.escape(p.name)}</h1>
<p>netquant {__version__}, target <b>{html.escape(gen.target)}</b>, flags <code>{html.escape(gen.cflags)}</code></p>
<h2>Summary</h2>
<ul><li>{len(p.steps)} kernels ({html.escape(getattr(gen, "profile", "") or gen.target)}); constants compiled
{gen.const_bytes:,} bytes; arena {p.arena_bytes:,} bytes per image
(per thread)</li><li>Input: {html.escape(p.input)} float32 {'x'.join(map(str, p.buffer(p.input).shape))};
output: {p.classes} scores; integer output checked bit for bit: {html.escape(p.int_output)}</li></ul>
<h2>Layers</h2>{layers}
<h2>Layers in float</h2>
<p>A lookup table replaces a chain of elementwise float ops on an 8-bit tensor (computed with the
reference executor's kernels: bit-exact). Float kernels compute in float32; only the quantize after
them can turn a last-bit float difference from the reference into an integer one
(docs/NUMERICS.md).</p>{floats}
<h2>Generated files</h2>{files}
{_arm_notes(gen)}<h2>Build</h2>{build}
</body></html>
"""
