"""The micro target's board side: the QEMU test bench (semihosting I/O, stack painting, the
board timer), linker script and Makefile, the cross build with arm-none-eabi-gcc, the ELF's flash
and RAM (size, nm) and the run on qemu-system-arm. See micro.py for the generated network.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from .micro import COMPILER, CPUS, MICRO_FLAGS, MICRO_RUNTIME, MicroPrinter, write_micro_report

# the CMSDK APB timer 0 of the MPS2 boards (25 MHz SYSCLK): the bench reads it around each run
TIMER0 = {"mps2-an385": 0x40000000, "mps2-an386": 0x40000000, "mps2-an500": 0x40000000}
SYSCLK_HZ = 25_000_000
# RAM and flash of the QEMU boards: (flash origin, flash bytes, RAM origin, RAM bytes)
BOARDS = {
    "mps2-an385": (0x00000000, 0x400000, 0x20000000, 0x400000),
    "mps2-an386": (0x00000000, 0x400000, 0x20000000, 0x400000),
    "mps2-an500": (0x00000000, 0x400000, 0x20000000, 0x400000),
    "mps3-an547": (0x00000000, 0x80000, 0x21000000, 0x100000),
}
def board_main(name: str, printer: MicroPrinter, timer: int = 0) -> str:
    """The QEMU test bench: images in and scores out through semihosting, the stack painted, and
    (``timer``: the address of a CMSDK timer, 0 for none) the timer ticks of each run, which
    count executed instructions under ``qemu-system-arm -icount shift=0`` (1 ns each)."""
    p = printer.p
    q = printer.buf(p.int_input).elements
    ob = printer.buf(p.int_output)
    return f"""/* Test bench for QEMU (and any board with a debugger that serves semihosting):
 * reads input.bin (int32 n, then n int8 images of {q} bytes), runs {name}_run on each, writes
 * scores.bin (n x {ob.elements} {ob.ctype}) and stats.bin (int32: stack bytes used by the network, arena
 * bytes, timer ticks of all runs). The stack below the caller is painted first; the lowest word
 * changed is its depth. The timer is the board's CMSDK timer 0 ({timer:#x}; 0: none), counting
 * down at SYSCLK. */
#include <stdint.h>
#include <string.h>
#include "{name}.h"

static int semihost(int op, const void *arg) {{
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}}
static int sh_open(const char *path, int mode) {{ const uint32_t a[3] = {{(uint32_t)path, (uint32_t)mode, strlen(path)}}; return semihost(0x01, a); }}
static int sh_read(int fd, void *buf, uint32_t n) {{ const uint32_t a[3] = {{(uint32_t)fd, (uint32_t)buf, n}}; return semihost(0x06, a); }}
static int sh_write(int fd, const void *buf, uint32_t n) {{ const uint32_t a[3] = {{(uint32_t)fd, (uint32_t)buf, n}}; return semihost(0x05, a); }}
static void sh_close(int fd) {{ semihost(0x02, &fd); }}
void sh_exit(int ok) {{ semihost(0x18, (const void *)(ok ? 0x20026 : 0x20024)); for (;;) {{}} }}

extern uint32_t __bss_end__;
#define PAINT 0xA5A5A5A5u
static int8_t image[{q}];
static {ob.ctype} scores[{ob.elements}];

__attribute__((noinline)) static uint32_t stack_pointer(void) {{
    uint32_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}}

#define TIMER0 {timer:#x}u
static uint32_t timer_value(void) {{
    return TIMER0 ? *(volatile uint32_t *)(TIMER0 + 4) : 0;   /* VALUE */
}}

int main(void) {{
    int32_t n = 0, stats[3] = {{0, {name.upper()}_ARENA_BYTES, 0}};
    if (TIMER0) {{
        *(volatile uint32_t *)(TIMER0 + 8) = 0xFFFFFFFFu;   /* RELOAD */
        *(volatile uint32_t *)(TIMER0 + 4) = 0xFFFFFFFFu;   /* VALUE */
        *(volatile uint32_t *)(TIMER0 + 0) = 1;             /* CTRL: enable */
    }}
    const int in = sh_open("input.bin", 1), out = sh_open("scores.bin", 5);   /* "rb", "wb" */
    if (in < 0 || out < 0 || sh_read(in, &n, 4) != 0) return 1;
    for (int32_t i = 0; i < n; ++i) {{
        if (sh_read(in, image, sizeof image) != 0) return 1;
        const uint32_t sp = stack_pointer() - 64;
        for (volatile uint32_t *w = &__bss_end__; (uint32_t)w < sp; ++w) *w = PAINT;
        const uint32_t t0 = timer_value();
        if ({name}_run(image, scores) != 0) return 1;
        stats[2] += (int32_t)(t0 - timer_value());   /* counts down */
        const uint32_t *w = &__bss_end__;
        while ((uint32_t)w < sp && *w == PAINT) ++w;
        if ((int32_t)(sp + 64 - (uint32_t)w) > stats[0]) stats[0] = (int32_t)(sp + 64 - (uint32_t)w);
        if (sh_write(out, scores, sizeof scores) != 0) return 1;
    }}
    sh_close(in);
    sh_close(out);
    const int st = sh_open("stats.bin", 5);
    if (st < 0 || sh_write(st, stats, sizeof stats) != 0) return 1;
    sh_close(st);
    return 0;
}}

/* start-up: .data from flash, .bss zeroed, the FPU/MVE coprocessors enabled (MVE needs CP10/11) */
extern uint32_t __data_load__, __data_start__, __data_end__, __bss_start__, __stack_top__;
void Reset_Handler(void) {{
    for (uint32_t *s = &__data_load__, *d = &__data_start__; d < &__data_end__;) *d++ = *s++;
    for (uint32_t *d = &__bss_start__; d < &__bss_end__;) *d++ = 0;
    *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;   /* CPACR: CP10, CP11 full access */
    __asm__ volatile("dsb\\n\\tisb");
    sh_exit(main() == 0);
}}
void Fault_Handler(void) {{ sh_exit(0); }}
__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {{
    (void (*)(void))&__stack_top__, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, Fault_Handler}};
"""


def linker_script(board: str) -> str:
    fo, fl, ro, rl = BOARDS[board]
    return f"""/* {board}: code and constants in flash, the arena and the stack in RAM */
MEMORY {{ FLASH (rx) : ORIGIN = {fo:#x}, LENGTH = {fl:#x}
         RAM (rwx) : ORIGIN = {ro:#x}, LENGTH = {rl:#x} }}
SECTIONS {{
  .text : {{ KEEP(*(.vectors)) *(.text*) *(.rodata*) . = ALIGN(4); }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
  __data_load__ = LOADADDR(.data);
  .data : {{ __data_start__ = .; *(.data*) . = ALIGN(4); __data_end__ = .; }} > RAM AT > FLASH
  .bss (NOLOAD) : {{ __bss_start__ = .; *(.bss*) *(COMMON) . = ALIGN(4); __bss_end__ = .; }} > RAM
  __stack_top__ = ORIGIN(RAM) + LENGTH(RAM);
}}
"""


def makefile(name: str, cpu: str) -> str:
    return f"""# Generated by netquant {__version__}: the micro target for {cpu}.
# On a board: add {name}.c (with {name}.h, netquant_rt.h, {MICRO_RUNTIME}) to the firmware
# project and call {name}_run(image, scores). `make` builds the QEMU test image {name}.elf.
CC = {COMPILER}
CFLAGS = {CPUS[cpu][0]} {MICRO_FLAGS}
{name}.elf: {name}.c {name}.h board_main.c board.ld netquant_rt.h {MICRO_RUNTIME}
\t$(CC) $(CFLAGS) -nostartfiles -T board.ld -Wl,--gc-sections --specs=nano.specs -o $@ board_main.c {name}.c -lc -lgcc
clean:
\trm -f {name}.elf
"""


def build_micro(gen, cc: Optional[str] = None, extra: str = "") -> Path:
    """Cross-compile the test image (``<name>.elf``) with arm-none-eabi-gcc, no -lm; record the
    flash and RAM of the library per layer (nm) and of the whole image (size) in ``gen.flash``
    and the report."""
    from .build import BuildError

    compiler = shutil.which(cc or COMPILER)
    if compiler is None:
        raise BuildError(f"{cc or COMPILER} not found: install it, e.g. 'apt-get install gcc-arm-none-eabi "
                         "libnewlib-arm-none-eabi' (Debian/Ubuntu)")
    n = gen.name
    cmd = [compiler, *gen.cflags.split(), *extra.split(), "-nostartfiles", "-T", "board.ld", "-Wl,--gc-sections",
           "--specs=nano.specs", "-o", f"{n}.elf", "board_main.c", f"{n}.c", "-lc", "-lgcc"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=gen.folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compiling the micro target failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    elf = gen.folder / f"{n}.elf"
    gen.build = {"command": " ".join(cmd), "seconds": round(time.time() - t0, 2), "warnings": proc.stderr,
                 "library": str(elf), "cached": False}
    gen.flash = elf_sizes(elf, gen)
    write_micro_report(gen)
    return elf


def elf_sizes(elf: Path, gen) -> dict:
    """Sizes from the ELF: ``size`` (text, data, bss) of the whole image, and from ``nm`` each
    symbol's bytes: per layer its step function and constants, the shared kernels, the arena."""
    tool = shutil.which("arm-none-eabi-size"), shutil.which("arm-none-eabi-nm")
    text, data, bss = (int(v) for v in subprocess.run([tool[0], str(elf)], capture_output=True, text=True,
                                                      check=True).stdout.splitlines()[1].split()[:3])
    syms = {}
    for line in subprocess.run([tool[1], "-S", "--size-sort", str(elf)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:   # a static function specialised by gcc is step_x.constprop.0: count it as step_x
            base = parts[3].split(".")[0]
            syms[base] = syms.get(base, 0) + int(parts[1], 16)
    layers = {}
    for s in gen.program.steps:
        code = syms.get(f"step_{s.output}", 0)
        const = sum(v for k, v in syms.items() if k.startswith(f"k_{s.output}_"))
        layers[s.node.name] = {"code": code, "const": const}
    shared = {k: v for k, v in syms.items() if k.startswith("nq_") and k != "nq_arena"}
    return {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": data + bss,
            "arena": syms.get("nq_arena", 0), "layers": layers, "shared_code": sum(shared.values()),
            "malloc": any(k in syms for k in ("malloc", "_malloc_r", "_sbrk", "_sbrk_r"))}


def run_qemu(gen, images: np.ndarray, timeout: float = 600, icount: bool = False) -> tuple[np.ndarray, dict]:
    """Run the test image on the QEMU board of the cpu with semihosting; ``images`` (N, C, H, W)
    int8. Returns the scores (N, classes) and {"stack": bytes, "arena": bytes, "instructions":
    executed instructions of all the runs, or None}. ``icount``: QEMU advances its clock 1 ns per
    instruction (-icount shift=0), so the board timer's ticks (SYSCLK 25 MHz: 40 ns each) count
    instructions to within 40 per run; only on the MPS2 boards (TIMER0)."""
    from .build import BuildError

    qemu = shutil.which("qemu-system-arm")
    if qemu is None:
        raise BuildError("qemu-system-arm not found: 'apt-get install qemu-system-arm'")
    folder, n = gen.folder, gen.name
    q = np.ascontiguousarray(images, np.int8)
    (folder / "input.bin").write_bytes(np.int32(len(q)).tobytes() + q.tobytes())
    for f in ("scores.bin", "stats.bin"):
        (folder / f).unlink(missing_ok=True)
    cmd = [qemu, "-M", CPUS[gen.profile][2], "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-kernel", f"{n}.elf"]
    if icount:
        cmd[1:1] = ["-icount", "shift=0"]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not (folder / "stats.bin").exists():
        raise BuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    classes = gen.program.buffer(gen.program.int_output)
    scores = np.frombuffer((folder / "scores.bin").read_bytes(), classes.ctype == "int8_t" and np.int8 or np.uint8)
    stack, arena, ticks = np.frombuffer((folder / "stats.bin").read_bytes(), np.uint32).astype(np.int64)
    board = CPUS[gen.profile][2]
    instructions = int(ticks) * (10 ** 9 // SYSCLK_HZ) if icount and board in TIMER0 else None
    return scores.reshape(len(q), -1), {"stack": int(stack), "arena": int(arena), "instructions": instructions}
