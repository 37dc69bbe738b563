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

from ..errors import ArgumentError

CONFIG_VERSION = 1
RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")   # netquant/calib/methods.py
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
        _check("activation_range", self.activation_range, RANGE_METHODS)
        _check("weight_range", self.weight_range, RANGE_METHODS)
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


# The other choices the CLI and the app offer, named here once (both read them from this module)
ENGINES = ("python", "c")          # what runs the int8 side of validate: the reference executor or the C library
CODEGEN_TARGETS = ("c", "cuda", "micro")    # code generation targets (micro: Arm Cortex-M, codegen/micro.py)
ARM_ISAS = ("neon", "neon-v8")                # isa choices of the aarch64 build (codegen/arm_neon.py)
CROSS_TRIPLES = ("aarch64-linux-gnu",)        # cross toolchains the C target builds with
MICRO_CPUS = ("cortex-m3", "cortex-m4", "cortex-m7", "cortex-m55")   # cores of the micro target
# the C build of each instruction set choice (codegen.build); "native" asks the compiler for this CPU's best
ISA_FLAGS = {
    "native": "-O3 -march=native",                    # this CPU's best: AMX, else AVX-512 VNNI, else portable C
    "avx512": "-O3 -march=native -DNQ_NO_AMX",        # AVX-512 VNNI even where AMX is present
    "avx2": "-O3 -mavx2 -mfma",
    "scalar": "-O2 -fno-tree-vectorize -DNQ_NO_SIMD",  # the portable path
}


def image_count(value):
    """A count of images as the CLI and the app take it: "all", or a positive integer (an int or
    its decimal text: 50 and "50" give 50; "0", "-3", "2.5", 2.5 and True are refused with a
    ValueError that says what is expected)."""
    if value == "all":
        return "all"
    n = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        n = int(value)
    if n is None or n <= 0:
        raise ValueError(f"count must be a positive integer or 'all', got {value!r}")
    return n


def target_config(target: str) -> QuantConfig:
    try:
        return TARGETS[target]
    except KeyError:
        raise ArgumentError(f"unknown target {target!r}; known: {', '.join(TARGETS)}") from None
