"""The quantization scheme of a model: what `from_pretrained(..., quantization=...)` takes and what a
quantized checkpoint records in its config.json (`quantization_config`)."""
from dataclasses import dataclass
from typing import Optional, Union

SCHEMES = ("int8", "int4")
QUANT_METHOD = "deepseek_vl2"  # the `quant_method` of a stored quantization_config: this library's own format
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantizationConfig:
    """int8: symmetric, one scale per output channel (`group_size` unused). int4: asymmetric, a scale
    and a zero point per group of `group_size` input columns (a smaller power of two where it does
    not divide a layer's input width: `group_for`). `lm_head`: also quantize the LM head, to int8
    whatever the scheme (its logits stay closest to the unquantized ones, and its int8 tiles serve
    every decode batch); off by default, the head stays in the activation dtype."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE
    lm_head: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r} is not supported; use one of {SCHEMES}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g & (g - 1):
            raise ValueError(f"quantization group_size must be a power of two >= 2, not {g!r}")
        if not isinstance(self.lm_head, bool):
            raise ValueError(f"quantization lm_head must be true or false, not {self.lm_head!r}")

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    def group_for(self, in_features: int) -> int:
        """Input columns per scale of a layer `in_features` wide: all of them for int8; for int4
        `group_size`, or the largest power of two below it that divides `in_features` (6848 = 64 x 107,
        the tiny dense MLP's width, gets 64)."""
        if self.scheme == "int8":
            return in_features
        if in_features % 2:
            raise ValueError(f"int4 packs two weights per byte: a layer {in_features} columns wide cannot be "
                             f"quantized to int4 (use int8)")
        group = self.group_size
        while in_features % group:
            group //= 2
        return group

    def describe(self) -> str:
        """What a user reads in a message: "int4 in groups of 128, the LM head in int8"."""
        text = self.scheme if self.scheme == "int8" else f"{self.scheme} in groups of {self.group_size}"
        return text + (", the LM head in int8" if self.lm_head else "")

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "scheme": self.scheme, "group_size": self.group_size,
                "lm_head": self.lm_head}


def parse_quantization(value: Union[None, str, dict, QuantizationConfig], where: str = "quantization"
                       ) -> Optional[QuantizationConfig]:
    """None, "int8", "int4", a QuantizationConfig, or the dict a checkpoint's config.json stores."""
    if value is None or isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        return QuantizationConfig(value)
    if isinstance(value, dict):
        method = value.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"{where}: quant_method {method!r} is not supported (this library reads and writes "
                             f"its own {QUANT_METHOD!r} format)")
        unknown = sorted(set(value) - {"quant_method", "scheme", "group_size", "lm_head"})
        if unknown or "scheme" not in value:
            raise ValueError(f"{where}: expected keys scheme, group_size and lm_head, got {sorted(value)}")
        return QuantizationConfig(value["scheme"], value.get("group_size", DEFAULT_GROUP_SIZE),
                                  value.get("lm_head", False))
    raise ValueError(f"{where} must be None, 'int8', 'int4' or a QuantizationConfig, not {value!r}")
