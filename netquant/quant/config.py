"""What the user asks the quantizer for: a frozen, validated, versioned config with a JSON round trip.

Targets pick defaults, as MATLAB's execution environments do:

========  ===================================================================================
gpu, cpu  float scales, weights per output channel, activations per tensor (min-max ranges)
fpga      power-of-two scales per tensor (fixed point, MATLAB's "scaled int8")
matlab    the same as fpga: what MATLAB's dlquantizer computes for every target
========  ===================================================================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..calib.methods import METHODS
from ..errors import ArgumentError

CONFIG_VERSION = 1
GRANULARITIES = ("per_channel", "per_tensor")
SCALES = ("float", "pow2")
OVERRIDE_KEYS = ("activation_range", "weight_granularity", "percentile", "weight_bits")


@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme. Per-layer ``overrides`` map a Network or Optimized Layer Name to a
    dict of the fields in OVERRIDE_KEYS (for example {"activation_range": "percentile"})."""

    weight_granularity: str = "per_channel"   # int8 weight scales per output channel or per tensor
    scale: str = "float"                      # "float" scales, or "pow2" (powers of two)
    activation_range: str = "minmax"          # range method for activations: minmax, percentile, entropy, mse
    weight_range: str = "minmax"              # range method for weights
    percentile: float = 99.99                 # used by the percentile method
    unsigned_activations: bool = True         # non-negative tensors use 0..255
    weight_bits: int = 8                      # weights take -(2^(b-1)-1)..2^(b-1)-1 (4: -7..7), stored in int8
    cle: bool = False                         # cross-layer equalisation of conv pairs before calibration
    bias_correction: bool = False             # shift biases by the mean output error on the calibration images
    adaround: bool = False                    # learned up/down rounding of the weights (AdaRound)
    adaround_iterations: int = 300            # optimisation steps per layer of AdaRound
    overrides: dict = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        _check("weight_granularity", self.weight_granularity, GRANULARITIES)
        _check("scale", self.scale, SCALES)
        _check("activation_range", self.activation_range, METHODS)
        _check("weight_range", self.weight_range, METHODS)
        if not 0 < self.percentile <= 100:
            raise ArgumentError(f"percentile must be in (0, 100], got {self.percentile}")
        if not (type(self.weight_bits) is int and 2 <= self.weight_bits <= 8):
            raise ArgumentError(f"weight_bits must be an integer in 2..8, got {self.weight_bits!r}")
        if not (type(self.adaround_iterations) is int and 1 <= self.adaround_iterations <= 100_000):
            raise ArgumentError(f"adaround_iterations must be an integer in 1..100000, got {self.adaround_iterations!r}")
        for flag in ("cle", "bias_correction", "adaround"):
            if not isinstance(getattr(self, flag), bool):
                raise ArgumentError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.version != CONFIG_VERSION:
            raise ArgumentError(f"config version {self.version} is not supported (expected {CONFIG_VERSION})")
        for layer, o in self.overrides.items():
            bad = set(o) - set(OVERRIDE_KEYS)
            if bad:
                raise ArgumentError(f"override for {layer!r}: unknown keys {sorted(bad)}; allowed: {OVERRIDE_KEYS}")
            replace(self, overrides={}, **o)  # validates the values

    @property
    def weight_levels(self) -> int:
        """The largest weight magnitude: 2^(weight_bits-1) - 1 (127 for 8 bits, 7 for 4)."""
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def adjusts_weights(self) -> bool:
        """Does calibration change the graph (CLE) or compute weight/bias adjustments?"""
        return self.cle or self.bias_correction or self.adaround

    def for_layer(self, names) -> "QuantConfig":
        """The config with the overrides of any of ``names`` applied."""
        cfg = self
        for n in names:
            if n in self.overrides:
                cfg = replace(cfg, **self.overrides[n])
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ArgumentError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


def _check(name, value, allowed):
    if value not in allowed:
        raise ArgumentError(f"{name} must be one of {allowed}, got {value!r}")


TARGETS = {
    "gpu": QuantConfig(),
    "cpu": QuantConfig(),
    "fpga": QuantConfig(weight_granularity="per_tensor", scale="pow2"),
    "matlab": QuantConfig(weight_granularity="per_tensor", scale="pow2"),
}


def target_config(target: str) -> QuantConfig:
    try:
        return TARGETS[target]
    except KeyError:
        raise ArgumentError(f"unknown target {target!r}; known: {', '.join(TARGETS)}") from None
