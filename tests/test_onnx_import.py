"""ONNX import (netquant.ir.onnx_import): torch-exported zoo nets at several opsets and both
exporters, hand-written ONNX graphs for what torch does not write (auto_pad, Gemm alpha/beta,
Shape chains, initializers listed as inputs, ...), quantization of the imported graphs, and the
errors.

Tolerances, by what is compared:
- imported float graph vs torch (or onnxruntime) on real CIFAR-10 test images: max |difference|
  <= 1e-4 of the largest output (``REL_TOL``); measured 0 to 9e-7 (BN folding, summation order).
  A wrong index, pad or axis lands at 1e-1 or more.
- int8 scores of an imported zoo net vs the torch model: ``SQNR_FLOOR`` 20 dB. Measured 25.7 dB
  (vgg) to 46.8 dB (biasnet) with 20 calibration images and 50 test images; the nets are
  random-initialised, so this is a check that the int8 network runs and tracks the float one,
  not an accuracy claim.
"""
import contextlib
import io
import re
import warnings

import numpy as np
import pytest
import torch

import zoo
from netquant.data.transforms import to_float
from netquant.ir.float_exec import run_float
from netquant.metrics import sqnr_db
from netquant.quantizer import Quantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from netquant.ir.onnx_import import OnnxImportError, import_onnx  # noqa: E402

REL_TOL = 1e-4
SQNR_FLOOR = 20.0
LEGACY_OPSETS = (11, 13, 20)   # 20: the newest the TorchScript exporter writes
C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(cifar):
    """8 real CIFAR-10 test images, float in [0, 1]."""
    return to_float(cifar.test.images[:8])


def export(model, opset: int) -> bytes:
    """The TorchScript exporter (dynamo=False), batch symbolic."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(2, 3, 32, 32), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["scores"],
                          dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}})
    return buf.getvalue()


def close(want, got) -> float:
    """max |want - got| relative to max |want|."""
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    assert want.shape[0] == got.shape[0] and want.size == got.size
    return float(np.abs(want.reshape(got.shape) - got).max() / np.abs(want).max())


def run(graph, x: np.ndarray) -> np.ndarray:
    return run_float(graph, torch.from_numpy(x), keep=())[graph.output].numpy()


def run_ort(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check_names(graph):
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == len(names)
    bad = [n for n in names if not C_IDENT.fullmatch(n)]
    assert not bad, f"node names that are not C identifiers: {bad}"


_rng = np.random.default_rng(0)


def w(*shape, scale=None):
    """A seeded random float32 weight, He-scaled by default."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (_rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(np.float32)


def make_model(nodes, inits: dict, opset: int, in_shape=("N", 3, 32, 32), extra_inputs=(), outputs=("y",)):
    """An ONNX model from nodes and {name: array} initializers, with input x and output(s) y."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))] + list(extra_inputs)
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "handwritten", inputs, outs, initializer=tensors)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(*v):
    return np.array(v, dtype=np.float32)


# --- torch-exported zoo nets ------------------------------------------------------------------
@pytest.mark.parametrize("opset", LEGACY_OPSETS)
@pytest.mark.parametrize("name", zoo.ARCHITECTURES + zoo.EXTRAS)
def test_zoo_float_matches_torch(name, opset, images):
    model = zoo.make(name)
    graph = import_onnx(export(model, opset), name=name)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    assert close(want, run(graph, images)) <= REL_TOL
    assert graph.source == name and graph.input.shape == (3, 32, 32)
    check_names(graph)


def test_zoo_float_ops_and_gathers(images):
    """The extras map as capture maps them: hardswish stays one float op (opset 11 writes it as
    HardSigmoid + Mul), nearest upsampling is an exact gather, bilinear a float interpolate."""
    se = import_onnx(export(zoo.make("se_hardswish"), 11))
    assert {n.attrs["fn"] for n in se.nodes if n.op == "float"} == {"hardswish", "sigmoid", "mul"}
    up = import_onnx(export(zoo.make("upsample"), 13))
    fns = [n.attrs["fn"] for n in up.nodes if n.op == "float"]
    assert fns == ["interpolate"]
    assert sum(n.op == "gather" and n.shape[1:] in ((8, 8), (16, 16)) for n in up.nodes) == 2


@pytest.mark.parametrize("name", zoo.ARCHITECTURES + zoo.EXTRAS)
def test_zoo_quantizes(name, cifar):
    """Quantizer(graph=import_onnx(...)) calibrates on 20 real training images and its int8
    network tracks the torch model on 50 real test images."""
    model = zoo.make(name)
    q = Quantizer(graph=import_onnx(export(model, 17), name=name), name=name)
    q.calibrate(cifar.train.images[:20])
    x = cifar.test.images[:50]
    scores = q.quantize().run(x)
    with torch.no_grad():
        want = model(torch.from_numpy(to_float(x))).numpy()
    assert scores.shape == want.shape
    assert sqnr_db(want, scores) >= SQNR_FLOOR


def test_quantizer_save_load_keeps_the_imported_graph(cifar, tmp_path):
    q = Quantizer(graph=import_onnx(export(zoo.make("resnet_b"), 13), name="resnet_b"))
    q.calibrate(cifar.train.images[:20])
    q.save(tmp_path / "r.nq")
    q2 = Quantizer.load(tmp_path / "r.nq")
    x = cifar.test.images[:10]
    assert np.array_equal(q.quantize().run(x), q2.quantize().run(x))


def dynamo_export(model):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), dynamo=True, opset_version=23).model_proto


# the dynamo exporter takes 4-16 s per net here (the first one loads onnxscript): slow tier
DYNAMO = ["upsample", "se_hardswish", "shufflenetv2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DYNAMO)
def test_dynamo_exporter(name, images):
    """torch.onnx.export(dynamo=True) at opset 23: other node names (metadata scopes), the
    batch norm folded by onnxscript, ReduceMean axes as an input."""
    pytest.importorskip("onnxscript")
    model = zoo.make(name)
    graph = import_onnx(dynamo_export(model), name=name)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    assert close(want, run(graph, images)) <= REL_TOL
    check_names(graph)


def test_names_follow_the_module_paths():
    """/stages.0/stages.0.0/conv1/Conv -> stages_0_0_conv1; the ONNX names stay in
    layers, so set_quantize and the calibration table know them."""
    graph = import_onnx(export(zoo.make("resnet_b"), 13))
    conv = graph.find_layer("/stages.0/stages.0.0/conv1/Conv")
    assert conv.name == "stages_0_0_conv1_relu"   # the block's ReLU module, fused
    assert conv.layers == ("/stages.0/stages.0.0/conv1/Conv", "/stages.0/stages.0.0/relu/Relu")
    # the residual add is an op of the block itself, so it keeps its op name; the same ReLU
    # module applied again is relu_1
    add = graph.find_layer("/stages.0/stages.0.0/Add")
    assert add.name == "stages_0_0_add_relu_1"
    assert graph.find_layer("/fc/Gemm").name == "fc"
    vgg = [n.name for n in import_onnx(export(zoo.make("vgg"), 13)).nodes]
    # Conv features.0 + ReLU features.2 (the batch norm features.1 folded by the exporter)
    assert vgg[:3] == ["input", "features_0_features_2", "features_3"]
    assert vgg[-2:] == ["classifier_1_classifier_2", "classifier_4"]


def test_sources_path_bytes_proto_and_external_data(tmp_path, images):
    data = export(zoo.make("lenet"), 13)
    path = tmp_path / "lenet_net.onnx"
    path.write_bytes(data)
    proto = onnx.load_from_string(data)
    ext = tmp_path / "ext" / "lenet_ext.onnx"
    ext.parent.mkdir()
    # weights in a separate file next to the model (onnx.save rewrites the proto it is given)
    onnx.save(onnx.load_from_string(data), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    graphs = [import_onnx(path), import_onnx(str(path)), import_onnx(data, name="x"), import_onnx(proto),
              import_onnx(ext)]
    assert graphs[0].source == "lenet_net" and graphs[2].source == "x" and graphs[4].source == "lenet_ext"
    outs = [run(g, images) for g in graphs]
    for o in outs[1:]:
        assert np.array_equal(outs[0], o)


# --- hand-written graphs ----------------------------------------------------------------------
def padding_and_pooling(opset):
    """Input normalisation as Sub/Div, SAME_UPPER conv and max pool (asymmetric), a dilated
    depthwise conv, Clip with min/max inputs, asymmetric average pooling counting the pads,
    ceil-mode max pooling, Gemm with transB=0, alpha and beta."""
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"], name="norm/Sub"),
        helper.make_node("Div", ["a", "std"], ["b"], name="norm/Div"),
        helper.make_node("Conv", ["b", "w1", "b1"], ["c"], name="stem", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["d"], name="stem_relu"),
        helper.make_node("MaxPool", ["d"], ["e"], name="pool1", kernel_shape=[3, 3], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["e", "w2"], ["f"], name="dw", group=8, dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Clip", ["f", "lo", "hi"], ["g"], name="relu6"),
        helper.make_node("AveragePool", ["g"], ["h"], name="pool2", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 0, 0], count_include_pad=1),
        helper.make_node("MaxPool", ["h"], ["i"], name="pool3", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("Flatten", ["i"], ["j"], name="flatten"),
        helper.make_node("Gemm", ["j", "w3", "b3"], ["y"], name="fc", alpha=0.5, beta=2.0),
    ]
    inits = {"mean": f32(0.49, 0.48, 0.45).reshape(1, 3, 1, 1), "std": f32(0.25, 0.24, 0.26).reshape(1, 3, 1, 1),
             "w1": w(8, 3, 3, 3), "b1": w(8, scale=0.1), "w2": w(8, 1, 3, 3), "lo": f32(0.0), "hi": f32(6.0),
             "w3": w(32, 10, scale=0.2), "b3": w(10, scale=0.1)}
    # 32 -SAME s2-> 16 -pool SAME s2-> 8 -dw-> 8 -avg (8+1-3)//2+1-> 4 -max ceil((4-3)/2)+1-> 2: 8*2*2 = 32
    return make_model(nodes, inits, opset)


def data_movement(opset):
    """Split (attribute before opset 13, input after), strided Slice, Concat, DepthToSpace, Pad
    with zeros, a Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain on the symbolic batch,
    MatMul + Add bias, Softmax."""
    split = ([helper.make_node("Split", ["r"], ["s0", "s1"], name="split", axis=1, split=[2, 6])] if opset < 13 else
             [helper.make_node("Split", ["r", "sizes"], ["s0", "s1"], name="split", axis=1)])
    unsq = (helper.make_node("Unsqueeze", ["n"], ["n1"], name="unsq", axes=[0]) if opset < 13 else
            helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="unsq"))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        *split,
        helper.make_node("MaxPool", ["s0"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Slice", ["s1", "st", "en", "ax", "steps"], ["sl"], name="slice"),
        helper.make_node("Concat", ["sl", "p"], ["cat"], name="cat", axis=1),
        helper.make_node("DepthToSpace", ["cat"], ["d2s"], name="d2s", blocksize=2),
        helper.make_node("Pad", ["d2s", "pads"], ["pad"], name="pad"),
        helper.make_node("Conv", ["pad", "w2"], ["c2"], name="conv2"),
        helper.make_node("Shape", ["c2"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero_scalar"], ["n"], name="batch", axis=0),
        unsq,
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["c2", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w3"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["mm", "b3"], ["logits"], name="fc/Add"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1),
    ]
    inits = {"w1": w(8, 3, 3, 3), "sizes": i64(2, 6), "st": i64(0, 1), "en": i64(32, 32), "ax": i64(2, 3),
             "steps": i64(2, 2), "pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "w2": w(4, 2, 3, 3), "zero": i64(0),
             "zero_scalar": np.array(0, np.int64), "minus1": i64(-1), "w3": w(4 * 32 * 32, 10, scale=0.05),
             "b3": w(10, scale=0.1)}
    # conv1 8x32x32; s0 2x32x32 -> pool 2x16x16; s1 6x32x32 -> slice 6x16x16 (from row 0, col 1);
    # cat 8x16x16 -> d2s 2x32x32 -> pad 2x34x34 -> conv2 4x32x32 -> (N, 4096) -> 10
    return make_model(nodes, inits, opset)


def elementwise(opset):
    """LeakyRelu, a non-torch HardSigmoid (affine + clamp), Mul and Sub of two activations,
    per-channel Add and Mul constants, a constant minus an activation, Max with a scalar, Sum,
    Tanh, Elu, Neg, bilinear Resize (half_pixel and align_corners), nearest Resize by sizes,
    ReduceMean (axes attribute before opset 18, input after), Gemm with transB."""
    reduce = (helper.make_node("ReduceMean", ["el", "axes"], ["rm"], name="gap", keepdims=0) if opset >= 18 else
              helper.make_node("ReduceMean", ["el"], ["rm"], name="gap", axes=[2, 3], keepdims=0))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("LeakyRelu", ["c"], ["lr"], name="lrelu", alpha=0.1),
        helper.make_node("HardSigmoid", ["lr"], ["hs"], name="hsig", alpha=0.25, beta=0.4),
        helper.make_node("Mul", ["lr", "hs"], ["gated"], name="gate"),
        helper.make_node("Add", ["gated", "chan"], ["ac"], name="add_const"),
        helper.make_node("Mul", ["gain", "ac"], ["mc"], name="mul_const"),
        helper.make_node("Sub", ["one", "mc"], ["om"], name="one_minus"),
        helper.make_node("Sub", ["om", "lr"], ["diff"], name="sub_act"),
        helper.make_node("Max", ["diff", "floor"], ["mx"], name="max0"),
        helper.make_node("Resize", ["mx", "", "scales2"], ["up"], name="up", mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        # sizes as torch writes them: Concat(Shape(x)[:2], (32, 32))
        helper.make_node("Shape", ["mx"], ["mx_shape"], name="up_nn/Shape"),
        helper.make_node("Slice", ["mx_shape", "zero", "two"], ["nc"], name="up_nn/Slice"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="up_nn/Concat", axis=0),
        helper.make_node("Resize", ["mx", "", "", "sizes"], ["up2"], name="up_nn", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Resize", ["mx", "", "scales2"], ["up3"], name="up_ac", mode="linear",
                         coordinate_transformation_mode="align_corners"),
        helper.make_node("Sum", ["up", "up2", "up3"], ["sum"], name="sum3"),
        helper.make_node("Tanh", ["sum"], ["th"], name="tanh"),
        helper.make_node("Conv", ["th", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Neg", ["c2"], ["ng"], name="neg"),
        helper.make_node("Elu", ["ng"], ["el"], name="elu", alpha=0.5),
        reduce,
        helper.make_node("Gemm", ["rm", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = {"w1": w(8, 3, 3, 3), "b1": w(8, scale=0.1), "chan": w(1, 8, 1, 1, scale=0.3), "gain": w(8, 1, 1),
             "one": f32(1.0), "floor": f32(-0.5), "scales2": f32(1, 1, 2, 2), "zero": i64(0), "two": i64(2),
             "hw": i64(32, 32),
             "w2": w(8, 8, 3, 3), "w3": w(10, 8), "b3": w(10, scale=0.1)}
    if opset >= 18:
        inits["axes"] = i64(2, 3)
    return make_model(nodes, inits, opset)


def old_exporter(opset=10):
    """Static batch 1, weights also listed as graph inputs, Clip with min/max attributes, a
    constant Reshape to [1, 8, -1], ReduceMean over the last axis of a rank-3 tensor."""
    extra = [helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 3, 3, 3])]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c"], ["cl"], name="clip", min=0.0, max=4.0),
        helper.make_node("Reshape", ["cl", "shape"], ["r"], name="view"),
        helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[2], keepdims=1),
        helper.make_node("Flatten", ["m"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = {"w1": w(8, 3, 3, 3), "shape": i64(1, 8, -1), "w2": w(10, 8), "b2": w(10, scale=0.1)}
    return make_model(nodes, inits, opset, in_shape=(1, 3, 32, 32), extra_inputs=extra)


HANDWRITTEN = [pytest.param(padding_and_pooling, 13, id="padding_and_pooling-13"),
               pytest.param(data_movement, 11, id="data_movement-11"),
               pytest.param(data_movement, 13, id="data_movement-13"),
               pytest.param(data_movement, 18, id="data_movement-18"),
               pytest.param(elementwise, 13, id="elementwise-13"),
               pytest.param(elementwise, 18, id="elementwise-18"),
               pytest.param(old_exporter, 10, id="old_exporter-10")]


@pytest.mark.parametrize("build, opset", HANDWRITTEN)
def test_handwritten_matches_onnxruntime(build, opset, images):
    model = build(opset)
    graph = import_onnx(model)
    x = images[:1] if build is old_exporter else images
    assert close(run_ort(model, x), run(graph, x)) <= REL_TOL
    check_names(graph)


def test_handwritten_structure():
    """What the ops became: the normalisation one affine, the asymmetric pads explicit zero-pad
    gathers, Gemm's alpha/beta folded into the linear layer, MatMul + Add one linear layer."""
    g = import_onnx(padding_and_pooling(13))
    ops = [n.op for n in g.nodes]
    assert ops[:3] == ["input", "affine", "gather"]   # Sub+Div merged; the SAME_UPPER pad of the stem
    fc = g.node("fc")
    assert fc.op == "linear" and fc.params["weight"].shape == (10, 32)
    g = import_onnx(data_movement(13))
    fc = g.find_layer("fc/Add")
    assert fc.op == "linear" and fc.layers == ("fc/MatMul", "fc/Add")
    assert g.node(g.output).attrs["fn"] == "softmax"


def test_quantizes_handwritten(cifar):
    q = Quantizer(graph=import_onnx(padding_and_pooling(13)), name="pads")
    q.calibrate(cifar.train.images[:20])
    out = q.quantize().run(cifar.test.images[:20])
    want = run(q.graph, to_float(cifar.test.images[:20]))
    assert sqnr_db(want, out) >= SQNR_FLOOR


def fully_convolutional(in_shape):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]
    return make_model(nodes, {"w1": w(8, 3, 3, 3), "w2": w(10, 8)}, 13, in_shape=in_shape)


def test_symbolic_spatial_input_needs_input_shape(images):
    model = fully_convolutional(("N", 3, "H", "W"))
    with pytest.raises(OnnxImportError, match=r"input 'x' has no static \(C, H, W\).*input_shape=\(C, H, W\)"):
        import_onnx(model)
    graph = import_onnx(model, input_shape=(3, 32, 32))
    assert graph.input.shape == (3, 32, 32)
    assert close(run_ort(model, images), run(graph, images)) <= REL_TOL
    with pytest.raises(OnnxImportError, match="disagrees with the model: input 'x' has channels 3"):
        import_onnx(fully_convolutional(("N", 3, "H", "W")), input_shape=(1, 32, 32))


def test_channels_last_input(images):
    """A TensorFlow-style NHWC input (N, 32, 32, 3) followed by a Transpose to NCHW: netquant
    still takes NCHW images; the two transposes cancel, so no gather is left."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    model = make_model(nodes, {"w1": w(4, 3, 3, 3)}, 13, in_shape=("N", 32, 32, 3))
    graph = import_onnx(model)
    assert graph.input.shape == (3, 32, 32)
    assert [n.op for n in graph.nodes] == ["input", "conv", "avgpool", "gather"]
    want = run_ort(model, np.ascontiguousarray(images.transpose(0, 2, 3, 1)))
    assert close(want, run(graph, images)) <= REL_TOL


# --- errors -----------------------------------------------------------------------------------
def test_unsupported_op_names_op_node_and_the_supported_list():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="/block/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Erf", ["c"], ["e"], name="/block/act/Erf"),
             helper.make_node("GlobalAveragePool", ["e"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    model = make_model(nodes, {"w1": w(4, 3, 3, 3)}, 13)
    with pytest.raises(OnnxImportError, match=r"'/block/act/Erf' \(Erf\): op Erf is not supported on "
                                              r"activations; supported: .*Conv.*Gemm"):
        import_onnx(model)


def test_unsupported_dead_op_is_ignored(images):
    """A node the output does not depend on is never imported (an Erf nobody reads)."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Erf", ["c"], ["unused"], name="debug_erf"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    model = make_model(nodes, {"w1": w(4, 3, 3, 3)}, 13)
    graph = import_onnx(model)
    assert close(run_ort(model, images), run(graph, images)) <= REL_TOL


@pytest.mark.parametrize("case, message", [
    ("two_inputs", r"2 inputs \(x, x2\); netquant imports image classifiers with exactly one input"),
    ("two_outputs", r"2 outputs \(y, c\); netquant needs exactly one"),
    ("mixes_images", r"'swap' \(Transpose\): data movement (mixes images|changes the batch)"),
    ("varies_over_space", r"'ramp' \(Mul\): a constant operand that varies over space"),
    ("custom_domain", r"'custom' \(MyOp\): op of domain 'com.example'"),
    ("int_input", r"input 'x' has element type INT64"),
])
def test_clear_errors(case, message):
    conv = helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1])
    inits = {"w1": w(4, 3, 3, 3)}
    extra, outputs, nodes = (), ("y",), [conv]
    if case == "two_inputs":
        extra = [helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 3, 32, 32])]
        nodes += [helper.make_node("Add", ["c", "x2"], ["y"], name="add")]
    elif case == "two_outputs":
        nodes += [helper.make_node("Relu", ["c"], ["y"], name="relu")]
        outputs = ("y", "c")
    elif case == "mixes_images":
        nodes += [helper.make_node("Transpose", ["c"], ["y"], name="swap", perm=[1, 0, 2, 3])]
    elif case == "varies_over_space":
        nodes += [helper.make_node("Mul", ["c", "ramp"], ["y"], name="ramp")]
        inits["ramp"] = np.linspace(0, 1, 32, dtype=np.float32)
    elif case == "custom_domain":
        nodes += [helper.make_node("MyOp", ["c"], ["y"], name="custom", domain="com.example")]
    if case == "int_input":
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 3, 32, 32])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
        model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 13)])
    else:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])] + list(extra)
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(nodes, "g", inputs, outs,
                                  initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
        opsets = [helper.make_opsetid("", 13)]
        if case == "custom_domain":
            opsets.append(helper.make_opsetid("com.example", 1))
        model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    with pytest.raises(OnnxImportError, match=message):
        import_onnx(model)


def test_not_an_onnx_file(tmp_path):
    with pytest.raises(OnnxImportError, match=r"ONNX file '.*missing.onnx' does not exist"):
        import_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(OnnxImportError, match="is not a readable ONNX model"):
        import_onnx(bad)
    with pytest.raises(OnnxImportError, match="source must be a path, bytes or onnx.ModelProto, got int"):
        import_onnx(3)


def test_self_check_catches_a_graph_that_differs():
    """Bilinear Resize by a non-integer scale (1.5): ONNX maps output pixels with the scale it is
    given, torch's interpolate(size=...) with in/out sizes (7/10 instead of 1/1.5), so the
    float op netquant has computes something else. The self-check against onnxruntime says so;
    check=False imports it anyway."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", strides=[4, 4]),
             helper.make_node("Resize", ["c", "", "scales"], ["r"], name="resize15", mode="linear"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, {"w1": w(4, 3, 6, 6), "scales": f32(1, 1, 1.5, 1.5), "w2": w(10, 4 * 10 * 10)}, 13)
    with pytest.raises(OnnxImportError, match="computes something else than the ONNX model: max difference"):
        import_onnx(model)
    graph = import_onnx(model, check=False)
    assert graph.node("resize15").shape == (4, 10, 10)
