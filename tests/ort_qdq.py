"""ONNX Runtime sessions for the checks that an exported int8 QDQ model means what the integer
executor computes.

ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into its own integer kernels. On
x86 CPUs without VNNI (AVX2 only, e.g. AMD Zen 3) MLAS multiplies uint8 x int8 with vpmaddubsw,
whose int16 sum of two products saturates: 255 * 127 + 255 * 127 = 64,770 > 32,767 (ONNX
Runtime's quantization docs name it and suggest reduce_range). The result then depends on the
CPU, not on the model: the zoo nets measured 86-98% top-1 agreement there against 99-100% on
VNNI CPUs. Where the CPU has no VNNI, the session therefore runs the graph as written
(ORT_DISABLE_ALL: dequantize, the float op, quantize), which is the meaning of the export.
"""
from functools import lru_cache

import onnxruntime as ort


@lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True     # not Linux: keep ONNX Runtime's default kernels
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def qdq_session(path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session for an exported QDQ model (a path or serialized bytes), on ``threads`` threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads    # the suite shares two cores with other work
    so.inter_op_num_threads = 1
    if not cpu_has_vnni():   # module docstring: no saturating integer kernels
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
