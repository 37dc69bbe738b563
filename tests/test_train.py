"""Training: the loss falls on real data, and a resumed run equals an uninterrupted one."""
import numpy as np
import pytest
import torch

from netquant.data.cifar10 import Cifar10
from netquant.models import resnet
from netquant.models.train import TrainConfig, evaluate, learning_rate, train


def small(cifar, n=512):
    return Cifar10(cifar.train.take(slice(0, n), f"first {n}"), cifar.test.take(slice(0, 200), "first 200"))


def test_tiny_training_run_lowers_the_loss(cifar):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, warmup_epochs=0.5, eval_every=4)
    data = small(cifar)
    net = resnet(8, 3)
    report = train(net, data, cfg)
    losses = [h["loss"] for h in report.history]
    assert losses[-1] < losses[0] - 0.1, losses
    # the reported top-1 is the trained network's on the test images
    assert report.epochs == 4 and report.test_top1 == pytest.approx(evaluate(net.eval(), data.test), abs=1e-9)


def test_resume_matches_uninterrupted(cifar, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, eval_every=2, bf16=False)
    data = small(cifar, 256)
    torch.manual_seed(1)
    a = resnet(8, 3)
    train(a, data, cfg)
    torch.manual_seed(1)
    b = resnet(8, 3)
    train(b, data, cfg, tmp_path, max_epochs_this_run=1)
    c = resnet(8, 3)  # fresh weights, all state comes from the checkpoint
    train(c, data, cfg, tmp_path, resume=True)
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.allclose(va.float(), vc.float(), atol=1e-5), k


def test_learning_rate_schedule():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2)
    assert learning_rate(cfg, 0, 100) == 0
    assert np.isclose(learning_rate(cfg, 100, 100), 0.05)
    assert np.isclose(learning_rate(cfg, 200, 100), 0.1)
    assert np.isclose(learning_rate(cfg, 600, 100), 0.05)
    assert learning_rate(cfg, 1000, 100) < 1e-12
