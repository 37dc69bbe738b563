"""The depthwise conv kernels of ``netquant/codegen/c_conv_dw.py`` (AVX-512 and AVX2), compiled
with gcc into a small library and compared bit for bit with the integer reference executor on
real quantized depthwise layers (calibrated on real CIFAR-10 images), plus their speed against
the portable C loop nest that serves depthwise convs today."""
import ctypes
import subprocess
import time
from importlib import resources

import numpy as np
import pytest
import torch
from torch import nn

from netquant.codegen.build import find_compiler
from netquant.codegen.c import c_array
from netquant.codegen.c_conv_dw import BLOCK, dw_call, dw_eligible, pack_dw, print_dw_kernel
from netquant.data.transforms import to_float
from netquant.quantizer import Quantizer
from netquant.ref.executor import INT_KERNELS, run_int8

pytestmark = pytest.mark.compiler

# build -> (isa, gcc flags, the CPU flag it needs); "avx512-novnni": vpmaddwd + vpaddd (Skylake-X)
BUILDS = {"avx512": ("avx512", ["-mavx512f", "-mavx512bw", "-mavx512vnni"], "avx512_vnni"),
          "avx512-novnni": ("avx512", ["-mavx512f", "-mavx512bw"], "avx512bw"),
          "avx2": ("avx2", ["-mavx2"], "avx2")}
CPU_FLAG = {"avx512": "avx512_vnni", "avx2": "avx2"}
ARGS = ", ".join(["const void *x", *(f"int {a}" for a in "H W C KH KW SH SW PH PW DH DW".split()),
                  "const int16_t *w", "const int32_t *b", "const int32_t *m", "const int32_t *s", "int lo", "int hi",
                  "void *y", "int OH", "int OW", "int oh0", "int oh1", "int is", "int os"])
CALL = "x, H, W, C, KH, KW, SH, SW, PH, PW, DH, DW, w, b, m, s, lo, hi, y, OH, OW, oh0, oh1, is, os"


def cpu_flags() -> set:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())


def _compile(tmp, name: str, source: str, flags: list) -> ctypes.CDLL:
    rt = resources.files("netquant.codegen") / "runtime"
    (tmp / f"{name}.c").write_text("#include <stdint.h>\n#include \"netquant_rt.h\"\n" + source)
    cmd = [find_compiler(), "-O2", *flags, "-std=c11", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
           "-ffp-contract=off", "-I", str(rt), "-o", str(tmp / f"{name}.so"), str(tmp / f"{name}.c")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(tmp / f"{name}.so"))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """build -> (isa, the library's entry point), each built with its own flags (-mavx2 alone for
    AVX2, as on a CPU without AVX-512)."""
    tmp = tmp_path_factory.mktemp("dw")
    out = {}
    for name, (isa, flags, need) in BUILDS.items():
        if need not in cpu_flags():
            continue
        src = print_dw_kernel(isa) + f"void run({ARGS}) {{ nq_dw_conv_{isa}({CALL}); }}\n"
        out[name] = (isa, _compile(tmp, name, src, flags).run)
    if not out:
        pytest.skip("this CPU has neither AVX-512 VNNI nor AVX2")
    return out


def _geometry(node, h: int, w: int) -> tuple:
    a = node.attrs
    kh, kw = node.params["weight"].shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def run_dw(fn, isa: str, node, x: np.ndarray, in_dtype: str, out_dtype: str, rows=None) -> np.ndarray:
    """Run the kernel of ``isa`` for depthwise conv ``node`` on integer input (N, C, H, W); the
    result as int64 (N, C, OH, OW). ``rows``: (oh0, oh1) calls, in any order (a thread split)."""
    n, c, h, w = x.shape
    a, p = node.attrs, node.params
    kh, kw = p["weight"].shape[2:]
    oh, ow = _geometry(node, h, w)
    wp = pack_dw(p["weight"], isa)
    b, m, s = (np.ascontiguousarray(p[k], np.int32) for k in ("bias", "multiplier", "shift"))
    lo, hi = a["clamp"]
    ptr = ctypes.c_void_p
    out = []
    for img in x:
        xi = np.ascontiguousarray(img.transpose(1, 2, 0).astype(np.dtype(in_dtype)))     # (H, W, C)
        y = np.full((oh, ow, c), 0x5A, np.dtype(out_dtype))                              # every byte must be written
        for r0, r1 in rows or [(0, oh)]:
            fn(xi.ctypes.data_as(ptr), h, w, c, kh, kw, *a["stride"], *a["padding"], *a["dilation"],
               wp.ctypes.data_as(ptr), b.ctypes.data_as(ptr), m.ctypes.data_as(ptr), s.ctypes.data_as(ptr), lo, hi,
               y.ctypes.data_as(ptr), oh, ow, r0, r1, int(in_dtype == "int8"), int(out_dtype == "int8"))
        out.append(y.transpose(2, 0, 1).astype(np.int64))
    return np.stack(out)


class DwNet(nn.Module):
    """1x1 conv -> BN (-> ReLU6) -> depthwise k x k conv -> BN (-> ReLU6) -> 1x1 conv -> pool ->
    linear: the depthwise layer of a MobileNet block, with uint8 or int8 input and output."""

    def __init__(self, c: int, k: int, stride: int, relu_in: bool, relu_out: bool, dilation: int = 1):
        super().__init__()
        act = (lambda on: nn.ReLU6() if on else nn.Identity())
        self.pw = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c), act(relu_in))
        self.dw = nn.Sequential(nn.Conv2d(c, c, k, stride, dilation * (k - 1) // 2, dilation=dilation, groups=c,
                                          bias=False), nn.BatchNorm2d(c), act(relu_out))
        self.head = nn.Sequential(nn.Conv2d(c, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.dw(self.pw(x)))


def _quantized_dw(cifar, c: int, k: int, stride: int, relu_in: bool, relu_out: bool, dilation: int = 1, seed: int = 0):
    """(qgraph, depthwise QNode) of a DwNet with measured BN statistics, calibrated on 20 real images."""
    torch.manual_seed(seed)
    model = DwNet(c, k, stride, relu_in, relu_out, dilation)
    with torch.no_grad():                 # non-trivial batch norms: statistics of real images, random affine
        model.train()
        model(torch.from_numpy(to_float(cifar.train.images[100:164])))
        for bn in (model.pw[1], model.dw[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    q = Quantizer(model.eval())
    q.calibrate(cifar.train.images[:20])
    qg = q.quantize().qgraph
    dws = [n for n in qg.nodes if n.op == "conv" and n.attrs["groups"] > 1]
    assert len(dws) == 1, [repr(n) for n in qg.nodes]
    return qg, dws[0]


def _dtype(qg, name: str) -> str:
    return next(n.dtype for n in qg.nodes if n.name == name)


# C (7: a tail of 7 channels on both ISAs), kernel size, stride, ReLU6 before, ReLU6 after
CASES = [(16, 3, 1, True, True), (16, 5, 2, False, True), (24, 3, 2, True, False), (24, 5, 1, True, True),
         (32, 3, 1, False, False), (32, 5, 2, True, True), (96, 3, 2, True, True), (96, 5, 1, False, True),
         (7, 3, 1, True, True), (7, 5, 2, False, False), (40, 3, 1, True, True, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "C{}-k{}-s{}-{}{}{}".format(
    c[0], c[1], c[2], "u8" if c[3] else "s8", "u8" if c[4] else "s8", f"-d{c[5]}" if len(c) > 5 else ""))
def test_bit_exact_with_the_reference_executor(case, kernels, cifar):
    """The kernel's output for a real quantized depthwise layer equals the reference executor's
    integers for that layer, fed the executor's own integer input from 4 real test images."""
    qg, node = _quantized_dw(cifar, *case)
    in_name = node.inputs[0]
    in_dtype, out_dtype = _dtype(qg, in_name), node.dtype
    assert (in_dtype, out_dtype) == ("uint8" if case[3] else "int8", "uint8" if case[4] else "int8")
    assert dw_eligible(node.op, node.attrs["groups"], case[0], case[0], in_dtype, node.quantized)
    ref = run_int8(qg, torch.from_numpy(to_float(cifar.test.images[:4])), keep=[in_name, node.name])
    x, want = ref[in_name].numpy(), ref[node.name].numpy().astype(np.int64)
    for name, (isa, fn) in kernels.items():
        got = run_dw(fn, isa, node, x, in_dtype, out_dtype)
        assert np.array_equal(got, want), (name, case, np.argwhere(got != want)[:5])


def test_dw_call_as_a_printer_uses_it(kernels, cifar, tmp_path):
    """A step function printed the way the C printer would (constant tables from c_array, the
    call from dw_call, output rows in two calls as two threads would run them), int8 in and out,
    stride 2, equals the reference executor on 2 real test images; a grouped conv is refused."""
    qg, node = _quantized_dw(cifar, 24, 3, 2, False, False)
    in_name = node.inputs[0]
    ref = run_int8(qg, torch.from_numpy(to_float(cifar.test.images[:2])), keep=[in_name, node.name])
    x, want = ref[in_name].numpy(), ref[node.name].numpy()
    assert (_dtype(qg, in_name), node.dtype) == ("int8", "int8")
    c, h, w = x.shape[1:]
    oh, ow = want.shape[2:]
    for name, (isa, _) in kernels.items():
        if name not in BLOCK:        # one build per ISA is enough here
            continue
        p = node.params
        src = [print_dw_kernel(isa), c_array("int16_t", "k_w", pack_dw(p["weight"], isa)),
               c_array("int32_t", "k_b", p["bias"]), c_array("int32_t", "k_m", p["multiplier"]),
               c_array("int32_t", "k_s", p["shift"]), "void step(const int8_t *x0, int8_t *y) {",
               "    " + dw_call(isa, node, (c, h, w), (c, oh, ow), "int8", "int8", "x0", "y", "k_w", "k_b", "k_m", "k_s",
                                rows=("0", f"{oh // 2}")),
               "    " + dw_call(isa, node, (c, h, w), (c, oh, ow), "int8", "int8", "x0", "y", "k_w", "k_b", "k_m", "k_s",
                                rows=(f"{oh // 2}", None)), "}"]
        step = _compile(tmp_path, f"step_{name}", "\n".join(src) + "\n", BUILDS[name][1]).step
        for img, exp in zip(x, want):
            xi = np.ascontiguousarray(img.transpose(1, 2, 0).astype(np.int8))
            y = np.zeros((oh, ow, c), np.int8)
            step(xi.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p))
            assert np.array_equal(y.transpose(2, 0, 1), exp), name
    grouped = node.with_(attrs=dict(node.attrs, groups=12), params=dict(node.params, weight=np.zeros((24, 2, 3, 3))))
    with pytest.raises(ValueError, match="not a depthwise conv.*groups 12"):
        dw_call("avx2", grouped, (24, h, w), (24, oh, ow), "int8", "int8", "x", "y", "w", "b", "m", "s")


def _moved_shifts(node, drop: int):
    """The node with (M >> drop, shift - drop) where that stays a valid shift."""
    p = dict(node.params, multiplier=(node.params["multiplier"] >> drop).astype(np.int32),
             shift=(node.params["shift"] - drop).astype(np.int32))
    return node.with_(params=p)


def test_random_inputs_geometries_and_shifts(kernels, cifar):
    """Random uint8/int8 tensors through a real layer's constants and variants of it (7x7 and
    non-square filters, no padding, stride (2, 1), dilation 2, shifts below 33 so requantization
    takes 64-bit lanes, an output clamp narrower than the type), each against the reference
    executor's conv kernel on the same integers; row ranges split as threads would."""
    qg, node = _quantized_dw(cifar, 24, 3, 1, True, True)
    assert node.params["shift"].min() >= 33          # the 32-bit high-half form for the layer as is
    rng = np.random.default_rng(0)
    c = 24
    variants = [node, _moved_shifts(node, 12)]
    assert variants[1].params["shift"].min() < 33
    for kh, kw, stride, pad, dil in [(7, 7, (1, 1), (3, 3), (1, 1)), (1, 3, (2, 1), (0, 1), (1, 1)),
                                     (3, 3, (1, 1), (0, 0), (2, 2)), (5, 3, (2, 2), (1, 2), (1, 1))]:
        w = rng.integers(-127, 128, (c, 1, kh, kw)).astype(np.int8)
        attrs = dict(node.attrs, stride=stride, padding=pad, dilation=dil, k_chunks=((0, kh * kw),), clamp=(-40, 90))
        variants.append(node.with_(attrs=attrs, params=dict(node.params, weight=w)))
    for v in variants:
        for in_dtype, out_dtype in [("uint8", "uint8"), ("int8", "int8"), ("int8", "uint8")]:
            lo, hi = v.attrs["clamp"]
            clamp = (max(lo, -128), min(hi, 127)) if out_dtype == "int8" else (max(lo, 0), min(hi, 255))
            v2 = v.with_(attrs=dict(v.attrs, clamp=clamp))
            x = rng.integers(*((-128, 128) if in_dtype == "int8" else (0, 256)), (2, c, 11, 9))
            want = INT_KERNELS["conv"](v2, torch.from_numpy(x).to(torch.int32)).numpy().astype(np.int64)
            oh = want.shape[2]
            for name, (isa, fn) in kernels.items():
                got = run_dw(fn, isa, v2, x, in_dtype, out_dtype, rows=[(oh // 2, oh), (0, oh // 2)])
                assert np.array_equal(got, want), (name, v2.attrs["stride"], v2.params["weight"].shape, in_dtype,
                                                   out_dtype, np.argwhere(got != want)[:5])


def test_pack_dw_layout_and_errors():
    """pack_dw puts w[c, t] where the kernel's lanes read it, and refuses what is not depthwise int8."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (37, 1, 3, 3)).astype(np.int8)
    for isa, blk in BLOCK.items():
        pk = pack_dw(w, isa)
        assert pk.shape == (-(-37 // blk), 5, 2, blk) and pk.dtype == np.int16
        for c in range(37):
            j = c % blk
            h, d = (j % 8) // 4, 4 * (j // 8) + j % 4          # lane of channel j in the lo/hi accumulator
            for t in range(9):
                assert pk[c // blk, t // 2, h, 2 * d + t % 2] == w[c, 0, t // 3, t % 3]
        assert pk[:, 4, :, 1::2].sum() == 0                    # the tenth tap of the last pair is 0
        assert np.abs(pk).sum() == np.abs(w.astype(np.int64)).sum()   # channels past C are 0
    with pytest.raises(ValueError, match=r"\(C, 1, KH, KW\), got \(8, 2, 3, 3\)"):
        pack_dw(np.zeros((8, 2, 3, 3), np.int8), "avx2")
    with pytest.raises(ValueError, match="unknown isa 'sse'"):
        pack_dw(w, "sse")
    with pytest.raises(ValueError, match="expected int8 weights"):
        pack_dw(np.full((4, 1, 3, 3), 300), "avx512")
    with pytest.raises(ValueError, match="unknown isa"):
        print_dw_kernel("neon")


PORTABLE = """
enum {{ C = {c}, H = {h}, W = {w}, OH = {oh}, OW = {ow}, KH = {k}, KW = {k}, SH = {s}, SW = {s}, PH = {p}, PW = {p} }};
/* the loop nest of CPrinter.conv_loops for a depthwise conv (CG = OG = 1), shapes as constants */
void portable(const uint8_t *restrict x0, const int8_t *restrict wt, const int32_t *restrict bias,
              const int32_t *restrict mult, const int32_t *restrict shift, uint8_t *restrict y) {{
    for (int oh = 0; oh < OH; ++oh)
        for (int ow = 0; ow < OW; ++ow) {{
            uint8_t *yp = y + (oh * OW + ow) * C;
            for (int o = 0; o < C; ++o) {{
                int32_t acc = bias[o];
                for (int kh = 0; kh < KH; ++kh) {{
                    const int ih = oh * SH - PH + kh;
                    if ((unsigned)ih >= (unsigned)H) continue;
                    for (int kw = 0; kw < KW; ++kw) {{
                        const int iw = ow * SW - PW + kw;
                        if ((unsigned)iw >= (unsigned)W) continue;
                        acc += (int32_t)x0[(ih * W + iw) * C + o] * (int32_t)wt[(o * KH + kh) * KW + kw];
                    }}
                }}
                yp[o] = (uint8_t)nq_requantize(acc, mult[o], shift[o], 0, 255);
            }}
        }}
}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(BLOCK))
def test_faster_than_the_portable_loop_nest(isa, tmp_path):
    """A MobileNetV2 depthwise layer (56x56x144, 3x3, stride 1, uint8) against the portable loop
    nest it runs on today (-O3 -march=native, shapes as compile-time constants): same integers, and
    at least 3x faster (measured 2026-12-02 on this Xeon: see the report)."""
    if CPU_FLAG[isa] not in cpu_flags():
        pytest.skip(f"this CPU has no {CPU_FLAG[isa]}")
    c, h, k, s, p = 144, 56, 3, 1, 1
    oh = (h + 2 * p - k) // s + 1
    src = (print_dw_kernel(isa) + f"void run({ARGS}) {{ nq_dw_conv_{isa}({CALL}); }}\n"
           + PORTABLE.format(c=c, h=h, w=h, oh=oh, ow=oh, k=k, s=s, p=p))
    lib = _compile(tmp_path, f"bench_{isa}", src, ["-O3", "-march=native"] if isa == "avx512" else ["-O3", "-mavx2"])
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (h, h, c)).astype(np.uint8)
    w = rng.integers(-127, 128, (c, 1, k, k)).astype(np.int8)
    wp, wt = pack_dw(w, isa), np.ascontiguousarray(w.reshape(c, -1))
    b = rng.integers(-5000, 5000, c).astype(np.int32)
    m = rng.integers(2 ** 30, 2 ** 31 - 1, c).astype(np.int32)
    sh = np.full(c, 45, np.int32)
    ya, yb = np.zeros((oh, oh, c), np.uint8), np.ones((oh, oh, c), np.uint8)
    ptr = ctypes.c_void_p
    args = [a.ctypes.data_as(ptr) for a in (x, wp, b, m, sh, ya)]

    def simd():
        lib.run(args[0], h, h, c, k, k, s, s, p, p, 1, 1, *args[1:5], 0, 255, args[5], oh, oh, 0, oh, 0, 0)

    def portable():
        lib.portable(args[0], wt.ctypes.data_as(ptr), *args[2:5], yb.ctypes.data_as(ptr))

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_simd, t_port = best(simd), best(portable)
    assert np.array_equal(ya, yb)
    print(f"{isa}: {t_simd * 1e3:.3f} ms against portable {t_port * 1e3:.3f} ms: {t_port / t_simd:.1f}x")
    assert t_port / t_simd > 3, (t_simd, t_port)
