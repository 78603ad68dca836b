"""``QuantSpec``: how one GEMM operand is quantized to NVFP4, and the named quantizers.

Every knob comes from a published method (see ``shared/research``):

- ``block``: ``"1x16"`` (one E4M3 scale per 16 elements along K) or ``"16x16"``
  (one scale per 16x16 tile, replicated into the 16 row slots; NVIDIA's weight
  scaling, so the forward and dgrad quantizations of W agree).
- ``outer``: ``"tensor"`` (one FP32 scale, from the amax of the whole tensor) or
  ``"block128"`` (TetraJet-v2 "double block": one unrounded FP32 scale per 1x128 block).
- ``cap``: the E4M3 value the largest block scale maps to (448, or 256 to leave
  headroom for four-over-six and the MS-EDEN correction).
- ``rounding``: ``"rtn"`` (round to nearest even, saturating), ``"sr"``
  (stochastic rounding of the elements) or ``"eden"`` (MS-EDEN: RTN elements
  plus a per-block correction folded into the E4M3 scale by stochastic rounding).
- ``headroom``: map block maxima to 6*16/17 instead of 6, so E4M3 rounding of the
  scale can never push an element past 6 (makes SR unbiased).
- ``clip``: MS-EDEN's clipping ratio: the block max maps to ``vmax = 6*(16/17)/clip``.
- ``scale_rule``: ``"max6"`` or ``"4over6"`` (per block, keep the scale mapping the
  max to 6 or to 4, whichever has the lower squared error; ties go to 6).
- ``rotation``: ``"none"``, ``"rht16_te"`` (TransformerEngine's fixed 16-point random
  Hadamard transform), ``"rht16"`` or ``"rht128"`` (fresh random signs per call).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuantSpec"]

_CHOICES = {
    "block": ("1x16", "16x16"),
    "outer": ("tensor", "block128"),
    "cap": (448, 256),
    "rounding": ("rtn", "sr", "eden"),
    "scale_rule": ("max6", "4over6"),
    "rotation": ("none", "rht16_te", "rht16", "rht128"),
}


@dataclass(frozen=True)
class QuantSpec:
    """How one operand is quantized to NVFP4 along its last (GEMM reduction) dim.

    Build one from its knobs or take a named one with :meth:`QuantSpec.named`.
    The spec is frozen and hashable, so it can be a ``torch.compile`` constant.
    Combinations no published method uses and that the kernels do not implement
    raise ``ValueError`` naming the conflict.
    """

    block: str = "1x16"
    outer: str = "tensor"
    cap: int = 448
    rounding: str = "rtn"
    headroom: bool = False
    clip: float = 1.0
    scale_rule: str = "max6"
    rotation: str = "none"

    def __post_init__(self) -> None:
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                raise ValueError(f"QuantSpec.{field}={value!r} is not one of {choices}")
        if not 0.0 < self.clip <= 1.0:
            raise ValueError(f"QuantSpec.clip={self.clip} must lie in (0, 1]")
        if self.block == "16x16":
            knobs = (self.outer, self.rounding, self.clip, self.scale_rule, self.rotation)
            if knobs != ("tensor", "rtn", 1.0, "max6", "none"):
                raise ValueError(
                    "16x16 blocks are implemented for the NVIDIA weight quantizer only "
                    "(per-tensor outer scale, RTN, max->6 rule, no rotation); got " + repr(self)
                )
        if self.rounding == "eden":
            if self.rotation not in ("rht16", "rht128"):
                raise ValueError(
                    "rounding='eden' (MS-EDEN) is unbiased only in expectation over random rotation "
                    "signs: use rotation='rht128' (Quartet II) or 'rht16'"
                )
            if self.scale_rule != "max6":
                raise ValueError("rounding='eden' cannot be combined with scale_rule='4over6'")
        if self.outer == "block128" and self.scale_rule != "max6":
            raise ValueError("scale_rule='4over6' needs outer='tensor' (its cap of 256 is a per-tensor scale rule)")
        if self.scale_rule == "4over6" and self.cap != 256:
            raise ValueError("scale_rule='4over6' needs cap=256 so the max->4 scale (1.5x) stays within E4M3's 448")

    # ------------------------------------------------------------------ derived
    @property
    def vmax(self) -> float:
        """The value a block's maximum maps to before E4M3 rounding of its scale."""
        return 6.0 * (16.0 / 17.0 if self.headroom else 1.0) / self.clip

    @property
    def stochastic(self) -> bool:
        """Whether the quantization draws random bits (SR elements or SR scales)."""
        return self.rounding in ("sr", "eden")

    @property
    def rotation_size(self) -> int:
        """Length of the Hadamard rotation along K (0 when there is none)."""
        return {"none": 0, "rht16_te": 16, "rht16": 16, "rht128": 128}[self.rotation]

    @property
    def random_signs(self) -> bool:
        """Whether the rotation draws fresh random signs on every call."""
        return self.rotation in ("rht16", "rht128")

    @property
    def k_multiple(self) -> int:
        """The multiple of which K (the last dim) must be."""
        return 128 if (self.outer == "block128" or self.rotation == "rht128") else 16

    @property
    def row_multiple(self) -> int:
        """The multiple of which the number of rows must be."""
        return 16 if self.block == "16x16" else 1

    @property
    def bytes_per_element(self) -> float:
        """Storage per element: codes (0.5 B), E4M3 scales (1/16 B), FP32 outer scales."""
        outer = 4.0 / 128 if self.outer == "block128" else 0.0
        return 0.5 + 1.0 / 16 + outer

    # ------------------------------------------------------------------ presets
    @classmethod
    def named(cls, name: str) -> "QuantSpec":
        """The named quantizer ``name``; raises ``ValueError`` listing valid names."""
        try:
            return _NAMED[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown quantizer {name!r}; valid names: {', '.join(_NAMED)}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """All named quantizers, in documentation order."""
        return tuple(_NAMED)

    def short_str(self) -> str:
        """Compact description, e.g. ``1x16/tensor/cap448/sr+hr/rht16``."""
        rounding = self.rounding + ("+hr" if self.headroom else "") + (f"+clip{self.clip:g}" if self.clip != 1 else "")
        parts = [self.block, self.outer, f"cap{self.cap}", rounding]
        if self.scale_rule != "max6":
            parts.append(self.scale_rule)
        if self.rotation != "none":
            parts.append(self.rotation)
        return "/".join(parts)


_NAMED: dict[str, QuantSpec] = {
    # TransformerEngine / NVIDIA NVFP4: amax/(6*448) tensor scale, E4M3 RNE scales, E2M1 RNE saturating.
    "rtn": QuantSpec(),
    # Four Over Six (MSE rule), global cap 256.
    "rtn_4over6": QuantSpec(cap=256, scale_rule="4over6"),
    # NVIDIA's 16x16 weight blocks.
    "rtn_2d": QuantSpec(block="16x16"),
    # Unbiased stochastic rounding: block max -> 6*16/17 so no element is clipped.
    "sr": QuantSpec(rounding="sr", headroom=True),
    # TransformerEngine's SR: block max -> 6, clamp at +-6 (slightly biased).
    "sr_te": QuantSpec(rounding="sr"),
    # TE's wgrad operands: fixed-sign RHT-16 then TE-style SR.
    "rht16_sr_te": QuantSpec(rounding="sr", rotation="rht16_te"),
    # Quartet II MS-EDEN: random-sign RHT-128, clip 6*16/17/0.93, cap 256, SR-rounded EDEN scale correction.
    "ms_eden": QuantSpec(rounding="eden", headroom=True, clip=0.93, cap=256, rotation="rht128"),
    # TetraJet-v2 double-block scaling (FP32 scale per 1x128 block, no tensor scale).
    "double_block_rtn": QuantSpec(outer="block128"),
    "double_block_rht16_sr": QuantSpec(outer="block128", rounding="sr", headroom=True, rotation="rht16"),
    # SR combined with 4/6: choosing the lower-error candidate after SR is biased (kept to document it).
    "sr_4over6": QuantSpec(rounding="sr", headroom=True, cap=256, scale_rule="4over6"),
    # TE's wgrad X^T operand: the fixed-sign RHT-16, then RTN (the forward input quantizer's columnwise copy).
    "rht16_rtn_te": QuantSpec(rotation="rht16_te"),
}
