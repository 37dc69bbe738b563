"""The per-image arena of the code generator's plan (netquant/codegen/program.py): two tensors
that are alive at the same step never share a byte, and every tensor fits in the arena. Checked
on the shipped ResNet-20 (a residual chain) and on zoo nets whose tensors branch and join
(MobileNetV2's inverted residuals, ShuffleNetV2's split/shuffle/concat). No compiler needed."""
import numpy as np
import pytest

import zoo
from netquant.codegen.program import plan
from netquant.quantizer import Quantizer


def _lifetimes(program) -> dict:
    """Storage name -> [first step that writes it, last step that reads it]: an alias (a gather
    that copies everything) is its target's storage; the integer output lives to the end (the
    CUDA target copies it out after the last step). Recomputed from the steps, independently of
    the planner's own bookkeeping."""
    def storage(name):
        b = program.buffer(name)
        return b.alias or name

    life = {}
    for i, s in enumerate(program.steps):
        life.setdefault(storage(s.output), [i, i])
        for b in s.inputs:
            life.setdefault(storage(b), [i, i])[1] = i
    life[storage(program.int_output)][1] = len(program.steps)
    return life


def _assert_no_live_overlap(program):
    life = _lifetimes(program)
    arena = [(name, program.buffer(name)) for name in life if program.buffer(name).offset >= 0]
    assert arena, "nothing in the arena"
    for name, b in arena:
        assert b.offset + b.nbytes <= program.arena_bytes, (name, b.offset, b.nbytes, program.arena_bytes)
    clashes = []
    for i, (na, a) in enumerate(arena):
        for nb, b in arena[i + 1:]:
            (fa, la), (fb, lb) = life[na], life[nb]
            live_together = not (la < fb or lb < fa)
            share_bytes = a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
            if live_together and share_bytes:
                clashes.append((na, nb))
    assert not clashes, clashes
    # and the planner reuses memory: the arena is smaller than all tensors side by side
    assert program.arena_bytes < sum(b.nbytes for _, b in arena)
    return len(arena)


def test_resnet20_tensors_alive_together_never_overlap(resnet20_quantizer):
    program = plan(resnet20_quantizer.quantize().qgraph, "resnet20")
    assert _assert_no_live_overlap(program) > 20


@pytest.mark.parametrize("name", ["mobilenetv2", "shufflenetv2"])
def test_zoo_tensors_alive_together_never_overlap(name):
    q = Quantizer(zoo.make(name))
    q.calibrate(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    program = plan(q.quantize().qgraph, name)
    assert _assert_no_live_overlap(program) > 20


def test_the_check_sees_an_overlap():
    """The check itself fails on a plan whose live tensors share bytes: a step's output moved
    onto the offset of its input (both alive at that step)."""
    from dataclasses import replace

    q = Quantizer(zoo.make("mobilenetv2"))
    q.calibrate(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    program = plan(q.quantize().qgraph, "m")
    step = next(s for s in program.steps if len(s.inputs) == 1 and program.buffer(s.inputs[0]).offset >= 0
                and program.buffer(s.output).offset >= 0 and not program.buffer(s.output).alias)
    buffers = dict(program.buffers)
    buffers[step.output] = replace(buffers[step.output], offset=buffers[step.inputs[0]].offset)
    with pytest.raises(AssertionError):
        _assert_no_live_overlap(replace(program, buffers=buffers))
