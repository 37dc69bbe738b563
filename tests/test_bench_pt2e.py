"""The PT2E peer of bench/bench_cpu.py quantizes torchvision-style blocks that call one ReLU
module twice (BasicBlock, Bottleneck): each call gets its own source partition."""
import operator
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao", reason="the PT2E peer needs torchao (pip install '.[bench]')")

from torch.fx.passes.utils.source_matcher_utils import get_source_partitions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench/ lies beside the package, not in it
from bench.bench_cpu import separate_activation_calls  # noqa: E402
from bench.models import BasicBlock  # noqa: E402


def test_reused_relu_calls_get_one_partition_each_and_the_x86_quantizer_takes_them():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, find_sequential_partitions, get_default_x86_inductor_quantization_config)
    block = BasicBlock(8, 8).eval()   # self.relu after conv1 and after the residual add
    x = torch.randn(2, 8, 12, 12)
    gm = separate_activation_calls(torch.export.export(block, (x,)).module())
    relus = [p for ps in get_source_partitions(gm.graph, [torch.nn.ReLU]).values() for p in ps]
    assert len(relus) == 2 and all(len(p.output_nodes) == 1 for p in relus)
    # the conv + add + ReLU fusion the quantizer looks for (after prepare_pt2e folds the batch
    # norms) is still found, once: conv2 -> add_ -> the second ReLU call
    _fuse_conv_bn_(gm)
    assert len(find_sequential_partitions(gm, [torch.nn.Conv2d, operator.add, torch.nn.ReLU])) == 1
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, quantizer)
    prepared(x)
    assert any("observer" in type(m).__name__.lower() for m in prepared.modules())
