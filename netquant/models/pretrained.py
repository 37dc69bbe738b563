"""Pretrained networks shipped inside the package: safetensors weights plus a JSON card.

``load_pretrained("cifarnet-20-16")`` reads ``weights/cifarnet-20-16.safetensors`` and
``weights/cifarnet-20-16.json`` (architecture, normalisation, test accuracy, recipe, dataset
checksums), builds the network and returns it in eval mode. Nothing is unpickled and nothing is
downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MissingFileError, ModelFileError
from .resnet import ResNet, ResNetSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"
CARD_VERSION = 1


def list_pretrained() -> list[str]:
    """Names of the shipped networks."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def read_card(name: str) -> dict:
    """The JSON card of a shipped network."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.exists():
        raise ModelFileError(f"no pretrained network named {name!r}; shipped: {', '.join(list_pretrained()) or 'none'}")
    return json.loads(path.read_text())


def load_weights(path: str | Path, card: dict) -> ResNet:
    """Build the network the card describes and load safetensors weights from ``path``."""
    from safetensors.torch import load_file

    if card.get("card_version") != CARD_VERSION:
        raise ModelFileError(f"{path}: model card version {card.get('card_version')!r}, expected {CARD_VERSION}")
    net = ResNet(ResNetSpec(**card["architecture"]))
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"{path}: weights do not match {card['name']}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return net.eval()


def load_model_file(path: str | Path) -> ResNet:
    """A network from a ``.safetensors`` file written by :func:`save_pretrained` (or ``netquant
    train --out``): its card is read from the file's metadata, else from ``<name>.json`` beside it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a safetensors file ({e})") from e
    if "netquant_card" in meta:
        card = json.loads(meta["netquant_card"])
    elif path.with_suffix(".json").exists():
        card = json.loads(path.with_suffix(".json").read_text())
    else:
        raise ModelFileError(f"{path}: no model card (expected netquant_card metadata or {path.with_suffix('.json').name})")
    net = load_weights(path, card)
    net.card = card
    return net


def load_pretrained(name: str = "cifarnet-20-16") -> ResNet:
    """A shipped pretrained network, in eval mode, with its card as ``net.card``."""
    card = read_card(name)
    net = load_weights(WEIGHTS_DIR / f"{name}.safetensors", card)
    net.card = card
    return net


def save_pretrained(net: ResNet, folder: str | Path, card_extra: dict) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` for ``net`` into ``folder``."""
    from safetensors.torch import save

    from ..fileio import write_bytes, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = net.spec.name
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    card = {"card_version": CARD_VERSION, "name": name, "architecture": net.spec.to_dict(),
            "input": {"layout": "NCHW", "channels": "RGB", "range": [0.0, 1.0],
                      "normalisation": {"mean": net.input.mean.flatten().tolist(),
                                        "std": net.input.std.flatten().tolist()}},
            **card_extra}
    # the card travels inside the weights file too, so one file is a complete model
    # atomic writes: an interrupted save leaves the old files, never a truncated one
    write_bytes(folder / f"{name}.safetensors", save(state, metadata={"name": name, "netquant_card": json.dumps(card)}))
    write_text(folder / f"{name}.json", json.dumps(card, indent=1) + "\n")
    return folder / f"{name}.json"
