"""The microcontroller target: a Program -> C99 for Arm Cortex-M (``--target micro --cpu ...``).

What a microcontroller needs and the x86 C does not give: no heap, no OpenMP, no libm in the
int8 path, weights as ``const`` data (flash) in exactly their int8 size, and one static arena
whose size is known at generation time. The entry point takes one quantized int8 image (NCHW,
the network's input quantization already applied) and writes the int8 scores:

    int net_run(const int8_t *image, int8_t *scores);

Memory plan (RAM): the steps from the input quantization to the integer output; a residual add
whose one operand is the conv just before it and whose other operand (the skip) is read by
nothing later is fused into that conv: each output element is requantized, added to the skip
element at the same position and written over it (netquant_micro.h), so the add needs no buffer.
The tensors are then placed in one arena by first fit over their lifetimes (the better of two
orders), with the int16 column scratch of each SIMD conv (2 pixels x KH*KW*C) live during its
own step only. Example, the shipped ResNet-20: at most two 16 KB tensors of stage 1 are live at
once (a conv's input and its output, which is also the skip), so the arena is 33,920 bytes:
32 KB of tensors and 1,152 bytes of column scratch past them (the 2,304-byte scratch of the
64-channel convs fits beside their 4 KB tensors); the x86 Program's arena is 49,216 bytes.

Kernels (netquant_micro.h): ungrouped convs on SMLAD (Cortex-M4/M7/M33: ``__ARM_FEATURE_DSP``)
or MVE/Helium VMLADAV (Cortex-M55), else portable C; every other step prints the portable
kernel of :class:`~netquant.codegen.c.CPrinter` (the same integer functions of netquant_rt.h).

Board files (micro_board.py, for the tests and as a template): a linker script and start-up code
for QEMU's ``mps2-an386`` (Cortex-M4) and ``mps3-an547`` (Cortex-M55), a test bench that reads
images and writes scores through semihosting and measures the stack it used by painting it, the
cross build and the QEMU run.
"""
from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .. import __version__
from ..fileio import write_text
from .c import CPrinter, Source, c_array
from .program import Buffer, CodegenError, Program, Step
from .report import _table

log = logging.getLogger(__name__)

MICRO_RUNTIME = "netquant_micro.h"
ARENA_ALIGN = 8

# cpu -> (compiler flags, Arm features the build uses, QEMU board or None)
CPUS = {
    "cortex-m4": ("-mcpu=cortex-m4 -mthumb -mfloat-abi=soft", "Armv7E-M DSP: SMLAD dual 16-bit MACs, SXTB16",
                  "mps2-an386"),
    "cortex-m7": ("-mcpu=cortex-m7 -mthumb -mfloat-abi=soft", "Armv7E-M DSP: SMLAD dual 16-bit MACs, SXTB16",
                  "mps2-an500"),
    "cortex-m55": ("-mcpu=cortex-m55 -mthumb -mfloat-abi=hard", "Armv8.1-M MVE (Helium): VMLADAV over 8 int16 "
                   "lanes, tail predication (VCTP)", "mps3-an547"),
    "cortex-m3": ("-mcpu=cortex-m3 -mthumb -mfloat-abi=soft", "none (no DSP extension): portable C", "mps2-an385"),
}
MICRO_FLAGS = "-O2 -std=c99 -ffunction-sections -fdata-sections -Wall -Wextra -Wno-unused-parameter"
COMPILER = "arm-none-eabi-gcc"


@dataclass(frozen=True)
class MicroPlan:
    """The micro Program (its steps from the input quantization on, fused adds, arena offsets),
    the scratch offset of each SIMD conv and the numbers the report gives."""

    program: Program
    fused: dict           # step output -> (the add QNode fused into the conv that writes it, the conv's
                          # own output buffer, the conv's operand index in the add)
    scratch: dict         # step output -> (offset, bytes) of its int16 column scratch
    arena_bytes: int
    largest_pair: int     # max over steps of (largest input + output): what any layer-by-layer executor needs
    int8_weight_bytes: int


def nq_conv_eligible(s: Step, in_dtype: str) -> bool:
    """Convs netquant_micro.h serves: ungrouped, integer, over 8-bit input."""
    return s.kind == "conv" and s.node.quantized and s.node.attrs["groups"] == 1 and in_dtype in ("int8", "uint8")


def column_bytes(s: Step) -> int:
    """NQ_COLUMN_BYTES of netquant_micro.h: 2 pixels x K int16, K = KH*KW*C rounded up to 8."""
    k = int(np.prod(s.node.params["weight"].shape[1:]))
    return 2 * 2 * (-(-k // 8) * 8)


def _root(buffers: dict, name: str, merged: dict) -> str:
    while True:
        if name in merged:
            name = merged[name]
        elif buffers[name].alias:
            name = buffers[name].alias
        else:
            return name


def _first_fit(items: list, order) -> tuple:
    """Offsets for (name, bytes, first, last) by first fit in ``order``: the lowest
    ARENA_ALIGN-aligned offset clear of every placed item whose lifetime overlaps."""
    placed, offsets = [], {}
    for name, size, first, last in sorted(items, key=order):
        offset = 0
        for o, e, f, l in sorted(placed):
            if not (last < f or l < first) and offset < e and o < offset + size:
                offset = -(-e // ARENA_ALIGN) * ARENA_ALIGN
        placed.append((offset, offset + size, first, last))
        offsets[name] = offset
    end = max((e for o, e, f, l in placed), default=0)
    return offsets, -(-end // ARENA_ALIGN) * ARENA_ALIGN


def micro_plan(p: Program, simd: bool = True) -> MicroPlan:
    """Steps from the input quantization to the integer output, adds fused, one arena (see the
    module docstring). ``simd``: reserve the column scratch of the SIMD convs."""
    if p.int_input is None:
        raise CodegenError("micro target: the network input feeds float layers besides its quantization; "
                           "the micro entry point takes the quantized int8 image")
    idx = {s.output: i for i, s in enumerate(p.steps)}
    first = idx[p.int_input] + 1
    last = idx.get(p.int_output)
    if last is None:
        raise CodegenError(f"micro target: the integer output {p.int_output} is not computed by a step")
    steps = list(p.steps[first:last + 1])
    for s in steps:
        if not s.node.quantized or s.kind == "lut":
            raise CodegenError(f"micro target: layer {s.node.name} ({s.kind}) runs in float; the micro target "
                               "generates integer networks only (quantize that layer, or use --target c)")
    bufs = dict(p.buffers)
    readers: dict = {}
    for i, s in enumerate(steps):
        for b in s.inputs:
            readers.setdefault(_root(bufs, b, {}), []).append(i)
    # fuse conv -> add where the conv output feeds the add only and the skip dies at the add
    fused, out_steps, merged = {}, [], {}
    i = 0
    while i < len(steps):
        s = steps[i]
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if (nxt is not None and nxt.kind == "add" and s.output in nxt.inputs and len(set(nxt.inputs)) == 2
                and nq_conv_eligible(s, bufs[s.inputs[0]].dtype) and s.output != p.int_output):
            skip = next(b for b in nxt.inputs if b != s.output)
            rs = _root(bufs, skip, {})
            conv_readers = readers.get(_root(bufs, s.output, {}), [])
            # the skip must not be the conv's own input (y = x + conv(x)): writing over it would
            # change pixels the conv has still to read
            if (conv_readers == [i + 1] and max(readers.get(rs, [])) == i + 1 and rs != p.input
                    and rs != _root(bufs, s.inputs[0], {}) and bufs[skip].shape == bufs[nxt.output].shape and bufs[skip].dtype in ("int8", "uint8")):
                step = Step(s.node, (s.inputs[0], skip), nxt.output, s.plan)
                fused[nxt.output] = (nxt.node, s.output, nxt.inputs.index(s.output))
                merged[nxt.output] = rs
                out_steps.append(step)
                i += 2
                continue
        out_steps.append(s)
        i += 1
    # lifetimes of storage roots: the quantized input from before the first step
    life: dict = {}
    life[_root(bufs, p.int_input, merged)] = [-1, -1]
    for j, s in enumerate(out_steps):
        life.setdefault(_root(bufs, s.output, merged), [j, j])
        for b in s.inputs:
            life.setdefault(_root(bufs, b, merged), [j, j])[1] = j
    life[_root(bufs, p.int_output, merged)][1] = len(out_steps)
    items = [(r, bufs[r].nbytes, f, l) for r, (f, l) in life.items()]
    if simd:
        items += [(f"scratch:{s.output}", column_bytes(s), j, j) for j, s in enumerate(out_steps)
                  if nq_conv_eligible(s, bufs[s.inputs[0]].dtype)]
    offsets, arena = min((_first_fit(items, order) for order in (lambda t: -t[1], lambda t: (t[2], -t[1]))),
                         key=lambda r: r[1])
    final = {}
    for name, b in bufs.items():
        r = _root(bufs, name, merged)
        if r in offsets:
            final[name] = Buffer(b.name, b.dtype, b.shape, offsets[r], None if r == name else r, "hwc")
    scratch = {s.output: (offsets[f"scratch:{s.output}"], column_bytes(s)) for s in out_steps
               if f"scratch:{s.output}" in offsets}
    pair = max(max((bufs[b].nbytes for b in s.inputs), default=0) + bufs[s.output].nbytes for s in steps)
    weights = sum(int(s.node.params["weight"].nbytes) for s in steps if s.kind in ("conv", "linear"))
    prog = replace(p, steps=tuple(out_steps), buffers=final, arena_bytes=arena)
    return MicroPlan(prog, fused, scratch, arena, pair, weights)


class MicroPrinter(CPrinter):
    """Prints a MicroPlan as C99 (see the module docstring)."""
    fuses_adds = False   # it fuses residual adds its own way (the MicroPlan), into its own conv kernels

    kernel_qualifier = "__attribute__((noinline)) static void"   # one symbol per layer: its code size in the report

    def __init__(self, mp: MicroPlan, in_scale: float, provenance: str = "", cpu: str = "cortex-m4"):
        super().__init__(mp.program, provenance, profile="scalar")
        self.mp = mp
        self.cpu = cpu
        self.in_scale = in_scale   # the input quantization's scale (the header says how to quantize)

    def signature(self, step: Step) -> str:
        if step.output in self.mp.fused:   # x1 (the skip) and y share storage: no restrict on them
            x, skip = (self.buf(i).ctype for i in step.inputs)
            return (f"{self.kernel_qualifier} {self.fn_name(step)}(const {x} *restrict x0, const {skip} *x1, "
                    f"{self.buf(step.output).ctype} *y)")
        return super().signature(step)

    def conv_struct(self, s: Step) -> str:
        """The const nq_conv of conv ``s`` (shapes, constants, the fused add)."""
        a = s.node.attrs
        c, h, w = self.hwc(self.buf(s.inputs[0]).shape)
        fused = self.mp.fused.get(s.output)
        conv_out = fused[1] if fused else s.output
        oc, oh, ow = self.hwc(self.p.buffers.get(conv_out, self.buf(s.output)).shape)
        kh, kw = s.node.params["weight"].shape[2:]
        lo, hi = a["clamp"]
        vals = [c, h, w, oc, oh, ow, kh, kw, *a["stride"], *a["padding"], *a["dilation"],
                int(self.buf(s.inputs[0]).dtype == "int8"), int(s.node.dtype == "int8"), lo, hi,
                *(self.const_name(s, k) for k in ("w", "bias", "mult", "shift"))]
        if fused:
            add, _, j = fused
            m = add.params["multiplier"]
            alo, ahi = add.attrs["clamp"]
            vals += [1, int(self.buf(s.inputs[1]).dtype == "int8"), int(m[j]), int(m[1 - j]),
                     int(add.params["shift"][0]), alo, ahi]
        else:
            vals += [0, 0, 0, 0, 1, 0, 0]
        return f"static const nq_conv {self.const_name(s, 'conv')} = {{{', '.join(map(str, vals))}}};\n"

    def k_conv(self, s: Step, o: Source):
        if nq_conv_eligible(s, self.buf(s.inputs[0]).dtype):
            off = self.mp.scratch.get(s.output, (0, 0))[0]
            skip = "x1" if s.output in self.mp.fused else "0"
            o(f"nq_conv_run(&{self.const_name(s, 'conv')}, x0, {skip}, y, (int16_t *)(nq_arena + {off}));")
        else:
            self.conv_loops(s, o)

    def kernel_label(self, s: Step) -> str:
        if nq_conv_eligible(s, self.buf(s.inputs[0]).dtype):
            fast = {"cortex-m55": "MVE VMLADAV", "cortex-m3": None}.get(self.cpu, "DSP SMLAD")
            add = f" + fused residual add ({self.mp.fused[s.output][0].name})" if s.output in self.mp.fused else ""
            return f"conv{add}: " + (f"{fast} where built with it, else portable C" if fast else "portable C")
        return f"{s.kind}: portable C"

    def micro_constants(self) -> str:
        out = []
        for s in self.p.steps:
            for key, arr in s.plan.tables().items():   # the target-neutral tables (program.py)
                arr = np.asarray(arr)
                ctype = {np.dtype("int64"): "int32_t"}.get(arr.dtype) or {
                    "i1": "int8_t", "u1": "uint8_t", "i2": "int16_t", "i4": "int32_t"}[arr.dtype.str[1:]]
                out.append(c_array(ctype, self.const_name(s, key), arr.astype(np.int32) if ctype == "int32_t" else arr))
            if s.kind == "conv" and nq_conv_eligible(s, self.buf(s.inputs[0]).dtype):
                out.append(self.conv_struct(s))
        return "\n".join(out)

    def const_bytes(self, s: Step) -> int:
        return sum(int(np.asarray(a).nbytes) for a in s.plan.tables().values())

    def micro_source(self) -> str:
        p, n = self.p, self.p.name
        qb = self.buf(p.int_input)
        c, h, w = self.hwc(qb.shape)
        ob = self.buf(p.int_output)
        body = Source()
        body.open(f"int {n}_run(const int8_t *image, {ob.ctype} *scores)")
        body("if (!image || !scores) return NQ_ERR_ARGUMENT;")
        body("uint8_t *const arena = nq_arena;")
        body(f"{qb.ctype} *q = {self.ptr(qb.name)};")
        body(f"for (int c = 0; c < {c}; ++c) for (int i = 0; i < {h * w}; ++i) q[i * {c} + c] = "
             f"({qb.ctype})image[c * {h * w} + i];  /* NCHW -> HWC */")
        for s in p.steps:
            body(f"{self.fn_name(s)}({', '.join(self.ptr(i) for i in s.inputs)}, {self.ptr(s.output)});")
        oc, oh, ow = self.hwc(ob.shape)
        body(f"for (int c = 0; c < {oc}; ++c) for (int i = 0; i < {oh * ow}; ++i) "
             f"scores[c * {oh * ow} + i] = {self.ptr(ob.name)}[i * {oc} + c];")
        body("return NQ_OK;")
        body.close()
        steps = "".join(self.step_function_texts())
        return f"""{self.header_comment()}/* Micro target ({self.cpu}): C99, no heap, no OpenMP, no libm; weights const (flash);
 * one static arena of {self.mp.arena_bytes} bytes. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define NQ_VNNI 0   /* the x86 vector paths of the shared kernels are not printed here */
#include "{n}.h"
#include "netquant_rt.h"
#include "{MICRO_RUNTIME}"

/* the one arena: every tensor of the network and the SIMD column scratch, offsets fixed */
static uint8_t nq_arena[{n.upper()}_ARENA_BYTES] __attribute__((aligned({ARENA_ALIGN})));

/* ---- constants (flash): int8 weights (O, KH, KW, C), int32 bias and requantization (M, shift) ---- */
{self.micro_constants()}
/* ---- kernels, one per layer ---- */
{steps}
{body.text()}
const char *{n}_kernels(void) {{
    return NQ_MICRO_KERNELS;
}}
"""

    def micro_header(self) -> str:
        p, n = self.p, self.p.name
        c, h, w = self.hwc(self.buf(p.int_input).shape)
        ob = self.buf(p.int_output)
        return f"""{self.header_comment()}#ifndef {n.upper()}_H
#define {n.upper()}_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {{
#endif
#define {n.upper()}_INPUT_C {c}
#define {n.upper()}_INPUT_H {h}
#define {n.upper()}_INPUT_W {w}
#define {n.upper()}_CLASSES {ob.elements}
#define {n.upper()}_ARENA_BYTES {max(self.mp.arena_bytes, ARENA_ALIGN)}
/* image: INPUT_C x INPUT_H x INPUT_W int8 (NCHW), the input already quantized (netquant_rt.h
 * nq_quantize: q = clamp(floor(x * float32(1 / {self.in_scale!r}) + 0.5f), -128, 127) of the
 * normalized image x);
 * scores: CLASSES integers ({ob.dtype}), real score = {ob.dtype} value x output scale.
 * Returns 0, or 1 (a null pointer). Not reentrant: one static arena. */
int {n}_run(const int8_t *image, {ob.ctype} *scores);
/* "mve", "dsp-smlad" or "portable": the conv kernels this build uses */
const char *{n}_kernels(void);
#ifdef __cplusplus
}}
#endif
#endif
"""



def generate_micro(qgraph, folder: Path, name: str, cpu: str, provenance: str = ""):
    """Plan, print and write the micro sources, the board files and the report; returns a Generated."""
    from .build import Generated
    from .micro_board import TIMER0, board_main, linker_script, makefile
    from .program import plan

    if cpu not in CPUS:
        raise ValueError(f"unknown --cpu {cpu!r} for the micro target: one of {', '.join(CPUS)}")
    t0 = time.time()
    p = plan(qgraph, name)
    mp = micro_plan(p, simd=cpu != "cortex-m3")
    in_scale = float(next(s.node.scale for s in p.steps if s.output == p.int_input))
    printer = MicroPrinter(mp, in_scale, provenance or "netquant integer network", cpu)
    runtime = resources.files("netquant.codegen").joinpath("runtime")
    board = CPUS[cpu][2]
    files = {f"{name}.c": printer.micro_source(), f"{name}.h": printer.micro_header(),
             "netquant_rt.h": runtime.joinpath("netquant_rt.h").read_text(),
             MICRO_RUNTIME: runtime.joinpath(MICRO_RUNTIME).read_text(),
             "board_main.c": board_main(name, printer, TIMER0.get(board, 0)), "board.ld": linker_script(board),
             "Makefile": makefile(name, cpu)}
    folder.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        write_text(folder / fname, text)
    flags = f"{CPUS[cpu][0]} {MICRO_FLAGS}"
    log.info("micro %s for %s: arena %d bytes, %d adds fused, %d bytes of constants", name, cpu, mp.arena_bytes,
             len(mp.fused), sum(printer.const_bytes(s) for s in mp.program.steps))
    gen = Generated(folder, mp.program, "micro", {k: v.count("\n") for k, v in files.items()}, flags,
                    kernels={s.node.name: printer.kernel_label(s) for s in mp.program.steps},
                    sizes={k: len(v.encode()) for k, v in files.items()}, profile=cpu,
                    const_bytes=sum(printer.const_bytes(s) for s in mp.program.steps),
                    seconds=round(time.time() - t0, 2),
                    layer_bytes={s.node.name: printer.const_bytes(s) for s in mp.program.steps}, micro=mp)
    write_micro_report(gen)
    return gen


def write_micro_report(gen) -> Path:
    """report.html of the micro target: per layer its kernel, flash (constants; code once built)
    and RAM (its output in the arena, the column scratch), the totals, the Arm features the
    build uses and how to build for a board."""
    mp, p = gen.micro, gen.program
    fl = gen.flash or {}
    rows = []
    for s in p.steps:
        out = p.buffer(s.output)
        lay = fl.get("layers", {}).get(s.node.name, {})
        scratch = mp.scratch.get(s.output, (0, 0))[1]
        rows.append([s.node.name, "+".join(s.node.layers), gen.kernels[s.node.name], out.dtype, "x".join(map(str, out.shape)),
                     gen.layer_bytes[s.node.name], lay.get("code", "not built"), out.nbytes,
                     f"+{out.offset}" + (f" (over {out.alias})" if out.alias else ""), scratch])
    layers = _table(["Layer", "Network layers", "Kernel", "Output type", "Output shape", "Flash: constants",
                     "Flash: code", "RAM: output", "Arena offset", "RAM: column scratch"], rows)
    built = ""
    if fl:
        built = (f"<li>ELF (arm-none-eabi-size, library and test bench): text {fl['text']:,}, data {fl['data']:,}, "
                 f"bss {fl['bss']:,} bytes: flash {fl['flash']:,}, static RAM {fl['ram']:,}; shared kernels "
                 f"{fl['shared_code']:,} bytes of code; arena symbol {fl['arena']:,} bytes; heap: "
                 f"{'USED' if fl['malloc'] else 'none (no malloc or sbrk linked)'}</li>")
    b = gen.build
    build = ("<p>Not built yet.</p>" if not b else
             f"<p>Command: <code>{html.escape(b['command'])}</code><br>Time: {b['seconds']} s</p>"
             f"<h3>Compiler warnings</h3><pre>{html.escape(b['warnings'] or 'none')}</pre>")
    text = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>netquant micro report: {html.escape(p.name)}</title>
<style>body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }} th {{ background: #f0f0f0; }}</style>
</head><body>
<h1>Micro target report: {html.escape(p.name)} for {html.escape(gen.profile)}</h1>
<p>netquant {__version__}; flags <code>{html.escape(gen.cflags)}</code></p>
<h2>Summary</h2><ul>
<li>Arm features used: {html.escape(CPUS[gen.profile][1])}; portable C with -DNQ_NO_SIMD or on a core without them</li>
<li>Flash: int8 weights {mp.int8_weight_bytes:,} bytes (exactly the network's), all constants {gen.const_bytes:,} bytes</li>
<li>RAM: one static arena of {mp.arena_bytes:,} bytes (tensors and column scratch); the largest pair of
live activations (a layer's largest input and its output) is {mp.largest_pair:,} bytes; {len(mp.fused)} residual adds
fused into their convs (written over the skip tensor)</li>{built}
<li>No heap, no OpenMP, no libm: the image links without -lm</li></ul>
<h2>Layers</h2>{layers}
<h2>Building for a board</h2>
<p>Add <code>{html.escape(p.name)}.c</code>, <code>{html.escape(p.name)}.h</code>, <code>netquant_rt.h</code> and
<code>{MICRO_RUNTIME}</code> to the firmware project, compile with <code>{html.escape(gen.cflags)}</code> (any
C99 compiler for Arm; CMSIS is not needed) and call <code>{html.escape(p.name)}_run(image, scores)</code>.
The weights are <code>static const</code> (the linker puts them in flash); the arena is one
<code>static</code> array in .bss. <code>board_main.c</code> and <code>board.ld</code> are the QEMU test
bench ({html.escape(CPUS[gen.profile][2] or '')}, semihosting): <code>make</code>, then
<code>qemu-system-arm -M {html.escape(CPUS[gen.profile][2] or '')} -nographic -semihosting-config enable=on,target=native -kernel {html.escape(p.name)}.elf</code>.</p>
<h2>Build</h2>{build}
</body></html>
"""
    path = gen.folder / "report.html"
    write_text(path, text)
    return path
