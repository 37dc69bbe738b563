"""4-bit weights (W4A8) end to end: packing, lowering, the 1-LSB bound against fake-quant, the
quantizer file, learnable memory, generated C (bit-exact with the reference executor), the CUDA
refusal, ONNX int4 QDQ in ONNX Runtime, and the accuracy numbers of issue 14 on the shipped
network (slow)."""
import json
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import zoo
from netquant.data.transforms import to_float
from netquant.errors import QuantizerFileError
from netquant.quant import int4
from netquant.quant.config import QuantConfig
from netquant.quantizer import Quantizer
from netquant.ref.executor import run_int8
from netquant.ref.fakequant import layerwise_lsb

W4 = QuantConfig(weight_bits=4)


def _w4(cifar, net="resnet_a", config=W4, images=32):
    q = Quantizer(zoo.make(net), config=config, example=torch.rand(2, 3, 32, 32))
    q.calibrate(to_float(cifar.train.images[:images]))
    return q


def _reference_int(qg, x):
    name = qg.int_output()
    return run_int8(qg, torch.from_numpy(x), keep=[name])[name].numpy()


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.fixture(scope="module")
def resnet_w4(cifar):
    return _w4(cifar)


def test_pack_is_two_nibbles_per_byte_and_unpack_inverts_it():
    assert int4.pack(np.array([3, -2, 7])).tolist() == [0xE3, 0x07]    # the docstring's example
    codes = np.random.default_rng(0).integers(-8, 8, size=(5, 3, 3, 3)).astype(np.int8)
    p = int4.pack(codes)
    assert p.dtype == np.uint8 and p.size == int4.packed_size(codes.size) == 68
    assert np.array_equal(int4.unpack(p, codes.size).reshape(codes.shape), codes)
    with pytest.raises(ValueError, match="-8..7"):
        int4.pack(np.array([8]))


def test_lowering_gives_4_bit_weights_within_one_lsb_of_fake_quant(resnet_w4, cifar):
    qg = resnet_w4.quantize().qgraph
    layers = [n for n in qg.nodes if n.op in ("conv", "linear") and n.quantized]
    assert layers and all(int4.is_int4(n) and n.attrs["weight_bits"] == 4 for n in layers)
    for n in layers:   # symmetric -7..7, and each channel's scale uses the range: some weight at +-7
        w = n.params["weight"].reshape(len(n.params["weight"]), -1)
        assert w.dtype == np.int8 and np.abs(w).max() == 7
        assert (np.abs(w).max(1) == 7).mean() > 0.9
    x = torch.from_numpy(to_float(cifar.test.images[:8]))
    assert max(layerwise_lsb(qg, x).values()) <= 1      # reference executor vs fake-quant, every layer


def test_weight_bits_per_layer_override(cifar):
    probe = _w4(cifar, config=QuantConfig(), images=8)
    first = next(n.name for n in probe.graph.nodes if n.op == "conv")
    q = _w4(cifar, config=QuantConfig(overrides={first: {"weight_bits": 4}}), images=8)
    qg = q.quantize().qgraph
    assert [n.name for n in qg.nodes if int4.is_int4(n)] == [first]
    details = q.quantization_details().set_index("Layer")
    w = qg.node(first).params
    assert details.loc[first, "QuantizedBytes"] == (w["weight"].size + 1) // 2 + 4 * w["bias"].size
    assert "int4 (two per byte)" in details.loc[first, "Types"]


def test_learnable_memory_counts_half_a_byte_per_4_bit_weight(resnet_w4):
    qg = resnet_w4.quantize().qgraph
    expected = sum((n.params["weight"].size + 1) // 2 + 4 * n.params["bias"].size
                   for n in qg.nodes if int4.is_int4(n))
    assert resnet_w4.learnable_memory()[1] == expected
    table = resnet_w4.calibration_table()
    assert set(table[table["Learnables / Activations"] == "Weights"].Type) == {"int4"}


def _rewrite(path, out, member, fn):
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files[member] = fn(files[member])
    with zipfile.ZipFile(out, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)


def test_quantizer_file_stores_packed_codes_and_round_trips_bit_exactly(resnet_w4, tmp_path):
    from safetensors.numpy import load, save

    a, b = tmp_path / "a.nq", tmp_path / "b.nq"
    resnet_w4.save(a)
    back = Quantizer.load(a)
    back.save(b)
    assert a.read_bytes() == b.read_bytes()                     # save -> load -> save: the same bytes
    qa, qb = resnet_w4.quantize().qgraph, back.quantize().qgraph
    for n in qa.nodes:
        for k, v in n.params.items():
            assert np.array_equal(v, qb.node(n.name).params[k]), (n.name, k)
    with zipfile.ZipFile(a) as z:
        manifest = json.loads(z.read("manifest.json"))
        stored = load(z.read("int4.safetensors"))
    layers = manifest["int4_weights"]["layers"]
    assert sorted(layers) == sorted(n.name for n in qa.nodes if int4.is_int4(n))
    for name, d in layers.items():
        w = qa.node(name).params["weight"]
        assert d == {"bits": 4, "shape": list(w.shape)}
        assert np.array_equal(stored[f"{name}/codes"], int4.pack(w))   # two per byte
    # an edited code is caught on load, naming the layer
    name = sorted(layers)[0]

    def flip(data):
        arrays = load(data)
        arrays[f"{name}/codes"] = arrays[f"{name}/codes"] ^ np.uint8(0x01)
        return save(arrays)

    _rewrite(a, tmp_path / "edited.nq", "int4.safetensors", flip)
    with pytest.raises(QuantizerFileError, match=f"layer {name}: the stored 4-bit weights differ"):
        Quantizer.load(tmp_path / "edited.nq")


@pytest.mark.compiler
@pytest.mark.parametrize("net, isa", [("resnet_a", "avx2"), ("resnet_a", "scalar"), ("mobilenetv2", "avx2"),
                                      ("resnet_a", "avx512")])
def test_generated_c_is_bit_exact_with_packed_weights(net, isa, resnet_w4, cifar, tmp_path):
    """AVX2 and AVX-512 VNNI (weights unpacked in the register tiles; the depthwise convs and the
    fully connected layer per layer) and the portable build (every layer per layer) against the
    reference executor. The VNNI build runs only where the CPU has VNNI (not this project's)."""
    from netquant.codegen import generate, load

    need = {"avx2": "avx2", "avx512": "avx512_vnni"}.get(isa)
    if need and need not in _cpu_flags():
        pytest.skip(f"this CPU has no {need}")
    qn = (resnet_w4 if net == "resnet_a" else _w4(cifar, net)).quantize()
    x = to_float(cifar.test.images[:20])
    ref = _reference_int(qn.qgraph, x)
    gen = generate(qn, tmp_path / isa, name="net", isa=isa)
    net_c = load(gen)
    assert np.array_equal(net_c.predict_int(x), ref), (net, isa)
    assert gen.build["warnings"].strip() == "", gen.build["warnings"]
    assert all("4-bit weights" in gen.kernels[n.name] for n in qn.qgraph.nodes if int4.is_int4(n))
    src = (tmp_path / isa / "net.c").read_text()
    if isa == "scalar":   # at rest the weights stay two per byte: each layer's constants are exactly
        for n in (n for n in qn.qgraph.nodes if int4.is_int4(n)):   # packed weights + bias, M, shift
            w = n.params["weight"]
            assert gen.layer_bytes[n.name] == int4.packed_size(w.size) + 12 * len(w), n.name
    if isa == "avx2" and net == "resnet_a":
        assert "vpmovzxbd" in src and "nq_unpack4_s16" in src   # in registers; the fallback per layer
    if isa == "avx512":
        assert "vpternlogd" in src


def _gcc_knows(march: str) -> bool:
    from netquant.codegen.build import find_compiler

    try:
        cc = find_compiler()
    except Exception:
        return False
    r = subprocess.run([cc, f"-march={march}", "-x", "c", "-c", "-o", "/dev/null", "-"], input="int x;",
                       capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.compiler
@pytest.mark.parametrize("profile, march", [("amx", "sapphirerapids"), ("vnni", "icelake-server")])
def test_avx512_and_amx_sources_with_4_bit_weights_compile(profile, march, resnet_w4, tmp_path):
    """The AVX-512 VNNI and AMX builds (this CPU cannot run them: compiled, warnings as errors)."""
    from netquant.codegen.build import COMMON_FLAGS, find_compiler
    from netquant.codegen.c import CPrinter
    from netquant.codegen.program import plan

    if not _gcc_knows(march):
        pytest.skip(f"the C compiler does not know -march={march}")
    CPrinter(plan(resnet_w4.quantize().qgraph, "net"), profile=profile).write(tmp_path, "")
    src = (tmp_path / "net.c").read_text()
    assert "nq_unpack4_s8(k_" in src                              # AMX, the fc layer, the fallbacks: per layer
    assert ("vpternlogd" in src) == (profile == "vnni")          # the VNNI tiles unpack in registers
    r = subprocess.run([find_compiler(), f"-march={march}", "-O2", *COMMON_FLAGS.split(), "-Werror", "-c", "net.c",
                        "-o", "net.o"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_cuda_refuses_4_bit_layers_naming_the_layer(resnet_w4, tmp_path):
    from netquant.codegen import generate
    from netquant.codegen.program import CodegenError

    first = next(n.name for n in resnet_w4.quantize().qgraph.nodes if int4.is_int4(n))
    with pytest.raises(CodegenError, match=f"layer {first}: 4-bit weights"):
        generate(resnet_w4.quantize(), tmp_path, target="cuda")


def test_onnx_export_is_int4_qdq_and_agrees_in_onnx_runtime(resnet_w4, cifar, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from netquant.export.onnx import export_quantized_onnx

    model = export_quantized_onnx(resnet_w4, tmp_path / "w4.onnx")
    assert model.opset_import[0].version == 21
    qg = resnet_w4.quantize().qgraph
    inits = {i.name: i for i in model.graph.initializer}
    for n in (n for n in qg.nodes if int4.is_int4(n)):
        t = inits[f"{n.name}.weight_int4"]
        assert t.data_type == onnx.TensorProto.INT4 and tuple(t.dims) == n.params["weight"].shape
        assert t.raw_data == int4.pack(n.params["weight"]).tobytes()        # the same two-per-byte codes
    x = to_float(cifar.test.images[:200])
    sess = ort.InferenceSession(str(tmp_path / "w4.onnx"), providers=["CPUExecutionProvider"])
    scores = sess.run(None, {"images": x})[0]
    ref = resnet_w4.quantize().run(x)
    agree = float((scores.argmax(1) == ref.argmax(1)).mean())
    assert agree >= 0.99, agree          # measured: 100% (ONNX rounds half to even, netquant half up)


# --- the shipped network (issue 14's "Must be true" for W4A8) ------------------------------------

@pytest.fixture(scope="module")
def shipped(cifar):
    from netquant.data import calibration_set
    from netquant.models.pretrained import load_pretrained

    calib = calibration_set(cifar)          # 200 training images (MATLAB's default)
    out = {}
    for key, cfg in (("naive", W4), ("adaround", QuantConfig(weight_bits=4, adaround=True, adaround_iterations=100))):
        q = Quantizer(load_pretrained("cifarnet-20-16"), config=cfg)
        q.calibrate(calib)                  # AdaRound learns on these 200 images only (100 steps a layer: 237 s
                                            # of CPU against 373 s for 300; 10,000-image drop 0.29 against 0.32)
        out[key] = q
    return out


@pytest.mark.slow
@pytest.mark.compiler
def test_w4a8_accuracy_and_memory_on_1000_test_images(shipped, cifar):
    """Top-1 on the first 1,000 test images, int8 side on the compiled C (bit-exact with the
    reference executor: test_w4a8_c_bit_exact_on_1000_images). Measured on all 10,000 (issue 14's
    closing note): float 92.61, W4A8 rounding to nearest 90.85 (-1.76), W4A8 with AdaRound 92.32
    (-0.29); on these 1,000 the naive drop is far outside the AdaRound one's noise too."""
    labelled = (cifar.test.images[:1000], cifar.test.labels[:1000])
    res = {k: q.validate(labelled, metrics=["top1"], engine="c", error_images=10) for k, q in shipped.items()}
    tops = {k: r.metrics["top1"].MetricOutput.tolist() for k, r in res.items()}
    fl = tops["naive"][0]
    assert tops["adaround"][0] == fl
    drops = {k: fl - t[1] for k, t in tops.items()}
    print(f"\nfloat {fl:.2f}; W4A8 naive {tops['naive'][1]:.2f} (drop {drops['naive']:.2f}); "
          f"W4A8 AdaRound {tops['adaround'][1]:.2f} (drop {drops['adaround']:.2f})")
    assert drops["adaround"] <= 1.0, drops
    assert drops["adaround"] < drops["naive"], drops
    fmem, qmem = shipped["adaround"].learnable_memory()
    assert fmem == 1_089_896
    print(f"learnable memory: float {fmem:,} bytes, W4A8 {qmem:,} bytes ({100 * (1 - qmem / fmem):.1f}% less)")
    assert 1 - qmem / fmem >= 0.85, (fmem, qmem)


@pytest.mark.slow
@pytest.mark.compiler
def test_w4a8_c_bit_exact_on_1000_images(shipped, cifar):
    q = shipped["adaround"]
    x = to_float(cifar.test.images[:1000])
    ref = np.concatenate([_reference_int(q.quantize().qgraph, x[i:i + 250]) for i in range(0, len(x), 250)])
    assert np.array_equal(q.compiled().predict_int(x), ref)


def _emulate(lines: list, memory: bytes, regs: dict) -> dict:
    """Run the weight-unpacking asm lines of codegen/int4.PackedIsa (AT&T syntax) on numpy byte
    vectors: the instructions' semantics from Intel's manual, for the VNNI tile that this CPU
    cannot run (and the AVX2 one, which it runs in the bit-exact tests)."""
    def lanes(v, bits, signed=False):
        return v.view({16: np.int16 if signed else np.uint16, 32: np.uint32}[bits])

    for line in lines:
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        dst = a[-1].lstrip("%")
        if op in ("vpmovzxbd", "vpmovzxbw"):     # the source is the weight pointer: ``memory``
            width = 32 if regs[dst].size == 32 else 64
            bits = 32 if op == "vpmovzxbd" else 16
            src = np.frombuffer(memory, np.uint8)[: width * 8 // bits]
            regs[dst] = src.astype({32: np.uint32, 16: np.uint16}[bits]).view(np.uint8).copy()
        elif op in ("vpslld", "vpsllw", "vpsraw"):
            k, src = int(a[0].lstrip("$")), regs[a[1].lstrip("%")]
            bits = 32 if op == "vpslld" else 16
            v = lanes(src.copy(), bits, signed=op == "vpsraw")
            regs[dst] = ((v >> k) if op == "vpsraw" else (v << k)).astype(v.dtype).view(np.uint8)
        elif op == "vpor":
            regs[dst] = regs[a[0].lstrip("%")] | regs[a[1].lstrip("%")]
        elif op == "vpternlogd":      # Intel order A = dst, B = second source, C = first source
            imm = int(a[0].lstrip("$"), 16)
            A, B, C = (np.unpackbits(regs[r.lstrip("%")]) for r in (a[3], a[2], a[1]))
            regs[dst] = np.packbits((imm >> (4 * A + 2 * B + C)) & 1).astype(np.uint8)
        elif op == "vpshufb":         # AT&T: control, table, dst; per 128-bit lane
            ctl, table = regs[a[0].lstrip("%")], regs[a[1].lstrip("%")]
            base = (np.arange(ctl.size) // 16) * 16
            regs[dst] = np.where(ctl & 0x80, 0, table[base + (ctl & 0x0F)]).astype(np.uint8)
        else:
            raise AssertionError(f"unknown instruction {line}")
    return regs


@pytest.mark.parametrize("which", ["AVX2_PACKED", "VNNI_PACKED"])
def test_in_register_unpacking_sequences_give_the_codes_back(which):
    from netquant.codegen import int4 as c4

    isa = getattr(c4, which)
    codes = np.random.default_rng(1).integers(-8, 8, size=2 * isa.wbytes).astype(np.int8)
    width = 32 if isa.reg == "ymm" else 64
    reg = lambda r: f"{isa.reg}{r}"   # noqa: E731
    regs = {reg(r): np.zeros(width, np.uint8) for r in range(32)}
    regs["[m]"] = np.full(width, 0x0F, np.uint8)                                   # the wsetup operands
    regs["[l]"] = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], np.int8), width // 16).view(np.uint8)
    lines = [line.replace("%%", "%") for line in isa.wload(0, isa.w_regs[0])]   # the asm text, unescaped
    out = _emulate(lines, int4.pack(codes).tobytes(), regs)
    w = out[reg(isa.w_regs[0])]
    got = w.view(np.int16) if isa.reg == "ymm" else w.view(np.int8)   # AVX2: int16 weights, VNNI: int8
    assert np.array_equal(got, codes), (got, codes)
