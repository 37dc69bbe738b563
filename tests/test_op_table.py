"""The op table (netquant/ir/ops.py) against everything that runs or prints an op: every kind it
lists has its kernel in every executor and printer that claims it, and no executor or printer
has a kernel for a kind it does not list. Adding an op is one table entry plus these kernels."""
import inspect

from netquant.codegen import program
from netquant.codegen.c import ELEMENT_KINDS, KERNEL_KINDS, CPrinter
from netquant.codegen.cuda import CudaPrinter
from netquant.export.onnx import EXPORTED_FLOAT_FNS, EXPORTS
from netquant.ir import ops
from netquant.ir.float_exec import FLOAT_KERNELS
from netquant.ir.float_ops import ELEMENTWISE_FNS, FLOAT_FNS
from netquant.quant.lower import LOWERINGS
from netquant.ref.executor import INT_KERNELS
from netquant.ref.fakequant import FAKE_RULES


def _methods(cls, prefix: str) -> set:
    return {name[len(prefix):] for name, _ in inspect.getmembers(cls, callable) if name.startswith(prefix)}


def test_every_entry_is_well_formed():
    for kind, spec in ops.OPS.items():
        assert spec.kind == kind
        assert spec.rule is None or spec.rule in ops.RULES, kind
        assert spec.rule is not None or spec.float_reason, f"{kind} always stays float: the table must say why"
        lo, hi = spec.arity
        assert 0 <= lo and (hi is None or lo <= hi), kind
        assert set(spec.levels) <= {ops.GRAPH, ops.QGRAPH, ops.PROGRAM} and spec.levels, kind
    assert set(ops.RULES) == {s.rule for s in ops.OPS.values() if s.rule}, "a rule no op uses"


def test_executors_have_exactly_the_kinds_of_the_table():
    assert set(INT_KERNELS) == set(ops.INT_OPS)
    assert set(FLOAT_KERNELS) == set(ops.FLOAT_KERNEL_OPS)


def test_lowering_and_fake_quant_cover_every_rule():
    graph_rules = {ops.OPS[k].rule for k in ops.QUANTIZABLE}
    assert set(LOWERINGS) == graph_rules
    assert set(FAKE_RULES) == set(ops.RULES)


def test_code_generation_takes_every_integer_program_kind():
    assert set(program.SUPPORTED) == set(ops.kinds(ops.QGRAPH))


def test_every_printer_has_a_kernel_for_every_kind_and_no_other():
    assert _methods(CPrinter, "k_") == set(KERNEL_KINDS)
    # CUDA runs the C kernels one thread per output (it overrides their loops, CPrinter.each_*):
    # its own kernels are only those whose C loops are shaped for a CPU (per input, a whole pixel)
    assert {k for k in KERNEL_KINDS if f"k_{k}" in vars(CudaPrinter)} == {"conv", "concat", "maxpool"}
    assert set(KERNEL_KINDS) == set(ops.INT_OPS) | {"affine"}
    # float layers and lookup tables: one output element at a time, shared by C and CUDA
    float_fns = {f for f in FLOAT_FNS if not FLOAT_FNS[f].elementwise}   # elementwise ones: CPrinter.unary
    assert _methods(CPrinter, "e_") == set(ELEMENT_KINDS) | float_fns
    assert set(CPrinter.UNARY) == set(ELEMENTWISE_FNS)


def test_onnx_exports_every_graph_kind_and_float_function():
    assert set(EXPORTS) == set(ops.GRAPH_OPS) - {"input"}
    assert set(EXPORTED_FLOAT_FNS) == set(FLOAT_FNS)


def test_graph_kinds_are_the_table_kinds():
    from netquant.ir.graph import Node

    for kind in ops.GRAPH_OPS:
        lo = ops.OPS[kind].arity[0]
        Node("n", kind, tuple(f"x{i}" for i in range(lo)))
        if lo:
            try:
                Node("n", kind, tuple(f"x{i}" for i in range(lo - 1)))
            except ValueError as e:
                assert f"{kind} reads {lo - 1} inputs" in str(e)
            else:
                raise AssertionError(f"{kind} took {lo - 1} inputs")
    for kind in set(ops.OPS) - set(ops.GRAPH_OPS):
        try:
            Node("n", kind)
        except ValueError as e:
            assert kind in str(e)
        else:
            raise AssertionError(f"the float graph took {kind!r}, a kind of a later IR only")
