"""The shipped pretrained ResNet-20: loads offline from safetensors + JSON, in eval mode, and is
as accurate as its card says on real CIFAR-10 test images."""
import pytest
import torch

from netquant.models.pretrained import (WEIGHTS_DIR, list_pretrained, load_model_file, load_pretrained, load_weights,
                                        read_card)
from netquant.models.train import evaluate


def test_shipped_networks_and_card():
    assert "cifarnet-20-16" in list_pretrained()
    card = read_card("cifarnet-20-16")
    assert card["architecture"] == {"net_width": 16, "num_units": 9, "unit_type": "standard", "num_classes": 10}
    assert card["dataset_md5"]["data_batch_1.bin"] == "5dd7e06a14cb22eb9f671a540d1b7c25"
    assert card["input"]["normalisation"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    # the target of the shipped ResNet-20 (He et al. report 91.25%); test_acceptance checks the
    # card's number against what the weights give on all 10,000 test images
    assert card["test_images"] == 10000 and card["status"] == "final" and card["test_top1"] >= 91.5


def test_loads_in_eval_mode():
    net = load_pretrained("cifarnet-20-16")
    assert not net.training and net.spec.depth == 20
    with torch.no_grad():
        p = net(torch.rand(3, 3, 32, 32))
    assert p.shape == (3, 10) and torch.allclose(p.sum(1), torch.ones(3))


def test_accuracy_on_a_real_test_slice(cifar):
    """The first 2,000 real test images: within 2 points of the card's number on all 10,000."""
    net = load_pretrained("cifarnet-20-16")
    acc = evaluate(net, cifar.test.take(slice(0, 2000), "first 2000"))
    assert abs(acc - net.card["test_top1"]) <= 2.0, acc


def test_bad_weights_and_names(tmp_path):
    with pytest.raises(ValueError, match="no pretrained network named 'nope'"):
        load_pretrained("nope")
    card = read_card("cifarnet-20-16")
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid, empty safetensors file
    with pytest.raises(ValueError, match="weights do not match cifarnet-20-16"):
        load_weights(bad, card)
    with pytest.raises(ValueError, match="model card version"):
        load_weights(WEIGHTS_DIR / "cifarnet-20-16.safetensors", {**card, "card_version": 7})
    # the card inside the shipped weights file is the JSON card beside it (a stale copy in either fails)
    assert load_model_file(WEIGHTS_DIR / "cifarnet-20-16.safetensors").card == card
