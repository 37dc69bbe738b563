"""A speed proxy for the Arm builds, since QEMU's time means nothing: multiply-adds (MACs) per
instruction of the conv kernels' inner loops, read from the compiled binaries' assembly.

    python bench/arm_macs.py [--data PATH] [--out FOLDER]

Builds the shipped ResNet-20 (calibrated on 200 training images) for aarch64 (``--isa neon``:
SDOT; ``neon-v8``: plain NEON; ``scalar``: portable C) and for Cortex-M (``cortex-m4``: SMLAD;
``cortex-m4`` with -DNQ_NO_SIMD: portable C; ``cortex-m55``: MVE), disassembles each binary
(objdump) and finds its innermost loops (a backward branch with no other backward branch inside
its range) that hold multiply-accumulate instructions: in the kernel function of the SIMD builds
(nq_conv_neon, nq_conv_dsp, nq_conv_mve, nq_conv_portable), in the loops that load int8 weights
in the portable aarch64 build (its conv kernels are inlined into their callers). MACs per iteration count the products of
each instruction (SDOT on .4s: 16; SMULL/SMLAL(2) on .8h: 8; SMLAD: 2; VMLADAVA.S16: 8; scalar
MADD/MLA/MUL: 1); instructions per iteration count every instruction in the loop's range. The
loop with the most MACs per instruction is taken as the conv's steady state (the 3x3 convs of
16 to 64 channels spend almost all their time in it). Debian's QEMU ships no TCG plugins (no libinsn.so),
so this is static, not an executed-instruction count: it leaves out the per-tile set-up,
reduction and requantization, which run once per KH*KW*C/16 iterations (dot product) or per
KH*KW*C MACs (portable). For the Cortex-M4 builds the executed instructions of the whole network
are counted too: under ``qemu-system-arm -icount shift=0`` QEMU's clock advances 1 ns per
instruction, and the test bench reads the board's 25 MHz CMSDK timer around ``resnet20_run``
(40 instructions per tick).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

MACS = {"sdot": 16, "udot": 16, "smull": 8, "smull2": 8, "smlal": 8, "smlal2": 8, "madd": 1, "msub": 1,
        "smaddl": 1, "smlad": 2, "smladx": 2, "mla": 1, "mul": 1, "smlabb": 1, "vmladava.s16": 8, "vmladav.s16": 8,
        "vmladava.s8": 16, "vmladav.s8": 16, "vmlava.s16": 8, "vmlav.s16": 8, "vmlava.s8": 16, "vmlav.s8": 16}
BRANCH = re.compile(r"^(b|b\.\w+|b\w\w(\.[nw])?|cbn?z|tbn?z|le|letp)$")


def parse(asm: str) -> list:
    """[(function, [(address, mnemonic, operands)])] from objdump -d."""
    funcs, cur = [], None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            cur = (m.group(1), [])
            funcs.append(cur)
            continue
        parts = line.split("\t")
        if cur is not None and len(parts) >= 3 and parts[0].strip().endswith(":"):
            mnemonic = re.sub(r"\.[nw]$", "", parts[2].strip())   # Thumb-2 width suffixes: mul.w is mul
            cur[1].append((int(parts[0].strip()[:-1], 16), mnemonic, parts[3].strip() if len(parts) > 3 else ""))
    return funcs


def macs_of(mnemonic: str, operands: str) -> int:
    if mnemonic == "mla" and ".4s" in operands:
        return 4
    if mnemonic in ("smull", "smlal", "smull2", "smlal2") and ".8h" not in operands:
        return 4 if ".4s" in operands else 0
    return MACS.get(mnemonic, 0)


def inner_loops(funcs: list, function: str = "") -> list:
    """(function, instructions, MACs) of every innermost loop holding MAC instructions, in the
    functions whose name starts with ``function``; without one (a portable build, its kernels
    inlined into their callers), the loops that load int8 weights (LDRSB) and multiply them."""
    out = []
    for name, ins in funcs:
        if function and not name.startswith(function):
            continue
        loops = []
        for addr, mn, ops in ins:
            t = re.match(r"([0-9a-f]+) <", ops.split(",")[-1].strip())
            if BRANCH.match(mn) and t and int(t.group(1), 16) <= addr:
                loops.append((int(t.group(1), 16), addr))
        for lo, hi in loops:
            if any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi for lo2, hi2 in loops):
                continue
            body = [(mn, ops) for a, mn, ops in ins if lo <= a <= hi]
            macs = sum(macs_of(mn, ops) for mn, ops in body)
            if macs and (function or any(mn == "ldrsb" for mn, ops in body)):
                out.append((name, len(body), macs))
    return out


def best_loop(binary: Path, objdump: str, function: str = "", extra=()) -> tuple:
    """The conv kernel's steady-state loop: the innermost MAC loop with the most MACs per
    instruction (then per iteration). For the portable builds that is generous to them: their
    best loop, where a loop range can also be a stretch of code jumped back into."""
    asm = subprocess.run([objdump, "-d", *extra, str(binary)], capture_output=True, text=True, check=True).stdout
    loops = inner_loops(parse(asm), function)
    return max(loops, key=lambda t: (t[2] / t[1], t[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 archive (default: $NETQUANT_DATA)")
    ap.add_argument("--out", help="folder for the builds (default: a temporary one)")
    args = ap.parse_args(argv)
    from netquant.codegen import build, generate
    from netquant.codegen.micro_board import build_micro, run_qemu
    from netquant.data.transforms import to_float
    from netquant.data import calibration_set, read_cifar10
    from netquant.models.pretrained import load_pretrained
    from netquant.quantizer import Quantizer

    cifar = read_cifar10(args.data or os.environ["NETQUANT_DATA"])
    q = Quantizer(load_pretrained())
    q.calibrate(calibration_set(cifar))
    qnet = q.quantize()
    root = Path(args.out or tempfile.mkdtemp(prefix="arm_macs_"))
    rows = []
    for isa, fn in (("neon", "nq_conv_neon"), ("neon-v8", "nq_conv_neon"), ("scalar", "")):
        gen = generate(qnet, root / isa, name="resnet20", isa=isa, cross="aarch64-linux-gnu")
        exe = build(gen)
        rows.append((f"aarch64 --isa {isa}", *best_loop(exe, "aarch64-linux-gnu-objdump", fn)))
    executed = []
    for cpu, extra, label, fn in (("cortex-m4", "", "DSP SMLAD", "nq_conv_dsp"),
                                  ("cortex-m4", "-DNQ_NO_SIMD", "portable", "nq_conv_portable"),
                                  ("cortex-m55", "", "MVE", "nq_conv_mve")):
        gen = generate(qnet, root / f"{cpu}{extra}", name="resnet20", target="micro", cpu=cpu)
        elf = build_micro(gen, extra=extra)
        rows.append((f"{cpu} {label}", *best_loop(elf, "arm-none-eabi-objdump", fn,
                                                  ["-marmv8.1-m.main"] if cpu == "cortex-m55" else [])))
        if cpu == "cortex-m4":   # executed instructions of the whole network: the board timer under -icount
            qin = quantized_input(qnet, gen, to_float(cifar.test.images[:1]))
            _, stats = run_qemu(gen, qin, icount=True)
            executed.append((f"{cpu} {label}", stats["instructions"], network_macs(gen.program)))
    print(f"{date.today()}: MACs per instruction of the conv inner loops (static, objdump)")
    print("| build | loop in | instructions / iteration | MACs / iteration | MACs / instruction |")
    print("|---|---|---|---|---|")
    for label, fn, n, macs in rows:
        print(f"| {label} | `{fn}` | {n} | {macs} | {macs / n:.2f} |")
    print(f"\n{date.today()}: executed instructions of one image (qemu-system-arm -M mps2-an386 -icount shift=0, "
          "the CMSDK timer read around resnet20_run)")
    print("| build | instructions / image | MACs / image | MACs / executed instruction |")
    print("|---|---|---|---|")
    for label, n, macs in executed:
        print(f"| {label} | {n:,} | {macs:,} | {macs / n:.3f} |")
    return 0


def network_macs(program) -> int:
    """Multiply-adds of one image: every conv (OH*OW*O*KH*KW*C/groups) and linear (O*K)."""
    total = 0
    for s in program.steps:
        if s.kind in ("conv", "linear") and s.node.quantized:
            w = s.node.params["weight"]
            out = program.buffer(s.output).shape
            total += int(w.size) * (int(out[1] * out[2]) if s.kind == "conv" else 1)
    return total


def quantized_input(qnet, gen, x):
    """The reference executor's int8 input tensor of images x (what the micro entry point takes)."""
    import numpy as np
    import torch
    from netquant.codegen.program import c_name
    from netquant.ref.executor import run_int8

    name = next(n.name for n in qnet.qgraph.nodes if c_name(n.name) == gen.program.int_input)
    return run_int8(qnet.qgraph, torch.from_numpy(x), keep=[name])[name].numpy().astype(np.int8)


if __name__ == "__main__":
    sys.exit(main())
