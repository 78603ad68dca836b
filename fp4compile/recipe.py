"""``Recipe``: how the three GEMMs of a linear layer are quantized, and the published presets.

A linear layer ``Y = X W^T`` (X [tokens, in], W [out, in]) trains with three GEMMs, each
with two operands quantized along that GEMM's reduction dim K:

=========  ==================  =======  ========
slot       GEMM                operand  K
=========  ==================  =======  ========
fwd.x      Y  = X W^T          X        in
fwd.w      Y  = X W^T          W        in
dgrad.dy   dX = dY W           dY       out
dgrad.w    dX = dY W           W^T      out
wgrad.dy   dW = dY^T X         dY^T     tokens
wgrad.x    dW = dY^T X         X^T      tokens
=========  ==================  =======  ========

The backward W and X operands come either from the high-precision tensor (``"hp"``:
X^T is then quantized during the forward and only its FP4 form is saved) or from the
dequantized forward quantization (``"forward"``: the backward is then the exact
gradient of the quantized forward, as TetraJet-v2 and Quartet II do).

Slots hold :class:`QuantSpec` (NVFP4), except in Wang et al.'s layout (the ``fp4_dge_occ`` preset):
:class:`~fp4compile.wang_format.RowE2M1` on both forward slots and
:class:`~fp4compile.wang_format.FP8Tensor` on the four backward slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from .eligibility import LayerFilter
from .outlier_channels import HotChannelPatch, OutControl
from .outliers import OutlierClamping
from .spec import QuantSpec
from .wang_format import FP8Tensor, RowE2M1

__all__ = ["Recipe", "SLOTS", "markdown_table"]

#: The six operand slots, in GEMM order.
SLOTS = ("fwd.x", "fwd.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")
_SOURCES = ("hp", "forward")


@dataclass(frozen=True)
class Recipe:
    """The quantizers of the six operand slots of a linear layer, and which layers stay high precision.

    Attributes:
        name: the registry key (``Recipe.named`` presets, or your own unique name).
        fwd_x, fwd_w, dgrad_dy, dgrad_w, wgrad_dy, wgrad_x: the :class:`QuantSpec` of each slot;
            all ``None`` for the unquantized ``bf16`` recipe.
        dgrad_w_source, wgrad_x_source: ``"hp"`` (quantize the high-precision W^T / X^T) or
            ``"forward"`` (re-quantize the transposed dequantized forward quantization).
        share_backward_signs: one random sign vector per backward call serves both backward
            GEMMs (Quartet II); otherwise dgrad and wgrad draw their own (TetraJet-v2). The two
            operands of one GEMM always share their signs, so the rotation cancels.
        keep_high_precision: ``fnmatch`` patterns of module FQNs whose linears stay unquantized.
        dge: Wang et al.'s Differentiable Gradient Estimator on the weights: the weight gradient is
            multiplied element-wise by ``format.dge_derivative`` (k = ``dge_k``, cap ``dge_cap``) of the
            weight in E2M1 units of its forward quantization, recomputed from W in the backward.
            Under SGD its mean multiplier (~0.59 at k = 5) also lowers the effective learning rate.
        dge_k, dge_cap: the estimator's sharpness and cap (the paper's 5 and 3.0).
        occ: Wang et al.'s outlier clamping and compensation of the activations
            (:class:`~fp4compile.outliers.OutlierClamping`), or None.
        outliers: outlier input channels handled apart: TetraJet-v2's
            :class:`~fp4compile.outlier_channels.OutControl` or CHON's
            :class:`~fp4compile.outlier_channels.HotChannelPatch`, or None. The layer then carries its state
            (``outlier_<field>`` buffers of its ``nn.Linear`` or ``NVFP4Linear``).
    """

    name: str
    fwd_x: Optional[QuantSpec] = None
    fwd_w: Optional[QuantSpec] = None
    dgrad_dy: Optional[QuantSpec] = None
    dgrad_w: Optional[QuantSpec] = None
    wgrad_dy: Optional[QuantSpec] = None
    wgrad_x: Optional[QuantSpec] = None
    dgrad_w_source: str = "hp"
    wgrad_x_source: str = "hp"
    share_backward_signs: bool = False
    keep_high_precision: tuple[str, ...] = ("lm_head", "*.lm_head")
    dge: bool = False
    dge_k: float = 5.0
    dge_cap: float = 3.0
    occ: Optional[OutlierClamping] = None
    outliers: Optional[Union[OutControl, HotChannelPatch]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Recipe.name must be a non-empty string, got {self.name!r}")
        specs = [self.spec(slot) for slot in SLOTS]
        if any(s is None for s in specs) and not all(s is None for s in specs):
            missing = [slot for slot, s in zip(SLOTS, specs) if s is None]
            raise ValueError(f"recipe {self.name!r}: give a QuantSpec for every slot or none; missing {missing}")
        for s, slot in zip(specs, SLOTS):
            if s is not None and not isinstance(s, (QuantSpec, RowE2M1, FP8Tensor)):
                raise TypeError(f"recipe {self.name!r}: slot {slot} must be a QuantSpec, got {type(s).__name__}")
        for field in ("dgrad_w_source", "wgrad_x_source"):
            if getattr(self, field) not in _SOURCES:
                raise ValueError(f"Recipe.{field}={getattr(self, field)!r} is not one of {_SOURCES}")
        if isinstance(self.keep_high_precision, str):
            raise TypeError("keep_high_precision must be a tuple of FQN patterns, not a string")
        if not isinstance(self.dge, bool):
            raise TypeError(f"Recipe.dge must be True or False, got {self.dge!r}")
        for field, value in (("dge_k", self.dge_k), ("dge_cap", self.dge_cap)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"Recipe.{field} must be a positive finite number, got {value!r}")
        if self.occ is not None and not isinstance(self.occ, OutlierClamping):
            raise TypeError(f"Recipe.occ must be an OutlierClamping or None, got {type(self.occ).__name__}")
        if self.outliers is not None and not isinstance(self.outliers, (OutControl, HotChannelPatch)):
            raise TypeError(
                f"Recipe.outliers must be an OutControl, a HotChannelPatch or None, got {type(self.outliers).__name__}"
            )
        if not self.quantized:
            if self.dge or self.occ is not None or self.outliers is not None:
                raise ValueError(
                    f"recipe {self.name!r}: dge, occ and outliers need quantized operands (give every slot a QuantSpec)"
                )
            return
        if self.outliers is not None:
            self._check_outliers(specs)
        if any(isinstance(s, (RowE2M1, FP8Tensor)) for s in specs):
            self._check_wang_layout(specs)
            return
        for gemm, (a, b) in {"fwd": ("fwd.x", "fwd.w"), "dgrad": ("dgrad.dy", "dgrad.w"),
                             "wgrad": ("wgrad.dy", "wgrad.x")}.items():  # fmt: skip
            ra, rb = self.spec(a).rotation, self.spec(b).rotation
            if ra != rb:
                raise ValueError(
                    f"recipe {self.name!r}: the {gemm} operands must share their rotation so it cancels in the GEMM; "
                    f"{a} has {ra!r}, {b} has {rb!r}"
                )
        if self.fwd_x.rotation != "none":
            raise ValueError(f"recipe {self.name!r}: forward rotations are not supported (no published recipe has one)")
        if self.fwd_x.stochastic or self.fwd_w.stochastic:
            raise ValueError(
                f"recipe {self.name!r}: stochastic forward quantizers are not supported (the forward is RTN in every "
                "published recipe; SR in the forward diverges per NVIDIA's ablation)"
            )

    def _check_outliers(self, specs: list) -> None:
        kind = type(self.outliers).__name__
        if any(not isinstance(s, QuantSpec) for s in specs) or self.dge or self.occ is not None:
            raise ValueError(
                f"recipe {self.name!r}: {kind} combines with NVFP4 slots only, without dge and occ (no published "
                "recipe combines them)"
            )
        if isinstance(self.outliers, HotChannelPatch):
            if self.fwd_x.outer != "tensor" or self.fwd_w.outer != "tensor":
                raise ValueError(
                    f"recipe {self.name!r}: the Hot-Channel Patch reuses the forward quantizations' per-tensor outer "
                    f"scales for its columns (CHON builds on NVIDIA's recipe); fwd.x is {self.fwd_x.short_str()}, "
                    f"fwd.w {self.fwd_w.short_str()}"
                )
            return
        if self.fwd_x.outer != "block128" or self.fwd_w.outer != "block128":
            raise ValueError(
                f"recipe {self.name!r}: OutControl's outlier columns join the forward GEMM as K-blocks with their own "
                "outer scales, which needs double-block forward quantizers (QuantSpec(outer='block128'), as "
                f"TetraJet-v2); fwd.x is {self.fwd_x.short_str()}, fwd.w {self.fwd_w.short_str()}"
            )
        if self.wgrad_x_source != "forward":
            raise ValueError(
                f"recipe {self.name!r}: OutControl needs wgrad_x_source='forward' (the wgrad X operand is re-quantized "
                "from the forward quantization, outlier channels from their outlier format, as TetraJet-v2)"
            )

    def _check_wang_layout(self, specs: list) -> None:
        forward_ok = all(isinstance(s, RowE2M1) for s in specs[:2])
        if not forward_ok or not all(isinstance(s, FP8Tensor) for s in specs[2:]):
            got = ", ".join(f"{slot}={type(s).__name__}" for slot, s in zip(SLOTS, specs))
            raise ValueError(
                f"recipe {self.name!r}: RowE2M1 and FP8Tensor slots go together in Wang et al.'s layout, the one "
                f"implemented: RowE2M1 on fwd.x and fwd.w, FP8Tensor on the four backward slots; got {got}"
            )
        for gemm, (a, b) in (("dgrad", ("dgrad.dy", "dgrad.w")), ("wgrad", ("wgrad.dy", "wgrad.x"))):
            if self.spec(a).fmt == self.spec(b).fmt == "e5m2":
                raise ValueError(
                    f"recipe {self.name!r}: the {gemm} GEMM cannot multiply two E5M2 operands (FP8 tensor cores "
                    "take E4M3 x E4M3 or E4M3 x E5M2); make one of them FP8Tensor('e4m3')"
                )

    # ------------------------------------------------------------------ queries
    @property
    def quantized(self) -> bool:
        """Whether the recipe quantizes at all (False for ``bf16``)."""
        return self.fwd_x is not None

    @property
    def fp8_backward(self) -> bool:
        """Whether this is Wang et al.'s layout: row-scaled E2M1 forward, FP8 backward (``wang_linear.py``)."""
        return isinstance(self.fwd_x, RowE2M1)

    def spec(self, slot: str) -> Optional[QuantSpec]:
        """The QuantSpec of ``slot`` (one of :data:`SLOTS`)."""
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}; valid slots: {', '.join(SLOTS)}")
        return getattr(self, slot.replace(".", "_"))

    def keeps_high_precision(self, fqn: str) -> bool:
        """Whether the linear at module path ``fqn`` matches one of ``keep_high_precision``."""
        return LayerFilter(tuple(self.keep_high_precision)).match([fqn]) is not None

    @property
    def reuses_forward_weight(self) -> bool:
        """Whether dgrad can use the forward quantization of W transposed: true for 16x16 blocks from the same
        source, whose quantization of W^T is exactly the transpose of that of W."""
        return self.quantized and self.fwd_w == self.dgrad_w and self.fwd_w.block == "16x16"

    # ------------------------------------------------------------------ presets and registry
    @classmethod
    def named(cls, name: str) -> "Recipe":
        """The preset or registered recipe ``name``; raises ``ValueError`` listing the valid names."""
        try:
            return _REGISTRY[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(_REGISTRY)}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Names of the presets and registered recipes."""
        return tuple(_REGISTRY)

    @classmethod
    def resolve(cls, recipe: Union[str, "Recipe"]) -> "Recipe":
        """``recipe`` itself (registering it under its name) or the recipe named ``recipe``."""
        if isinstance(recipe, Recipe):
            return recipe.register()
        if isinstance(recipe, str):
            return cls.named(recipe)
        raise TypeError(f"recipe must be a Recipe or a recipe name, got {type(recipe).__name__}")

    def register(self) -> "Recipe":
        """Make this recipe reachable by name (compiled graphs and torch.library ops refer to it by name).

        Registering a different recipe under a taken name raises ``ValueError``.
        """
        existing = _REGISTRY.get(self.name)
        if existing is not None and existing != self:
            raise ValueError(f"a different recipe is already registered as {self.name!r}; choose another name")
        _REGISTRY[self.name] = self
        return self

    def options_str(self) -> str:
        """The DGE, OCC and outlier-channel options as text (``-`` for none)."""
        parts = []
        if self.dge:
            parts.append(f"DGE k={self.dge_k:g} cap={self.dge_cap:g}")
        if self.occ is not None:
            residual = "no compensation" if not self.occ.compensates else f"{self.occ.residual} compensation"
            parts.append(f"OCC alpha={self.occ.alpha:g} per {self.occ.granularity}, {residual}")
        o = self.outliers
        if isinstance(o, OutControl):
            last = o.start + o.window - 1
            parts.append(f"OutControl {o.ratio:g} of channels in {o.outlier_format} (forwards {o.start}-{last})")
        elif isinstance(o, HotChannelPatch):
            parts.append(f"Hot-Channel Patch k={o.k} every {o.period} forwards, {o.residual} residuals")
        return "; ".join(parts) or "-"

    def describe(self, slot: str) -> str:
        """One slot as text: the named quantizer (or its knobs) and its source."""
        spec = self.spec(slot)
        if spec is None:
            return "bf16"
        names = [n for n in QuantSpec.names() if QuantSpec.named(n) == spec]
        text = names[0] if names else spec.short_str()
        if slot == "dgrad.w" and self.dgrad_w_source == "forward":
            text += " of deq(fwd.w)"
        if slot == "wgrad.x" and self.wgrad_x_source == "forward":
            text += " of deq(fwd.x)"
        return text


def markdown_table(recipes: Optional[tuple[str, ...]] = None) -> str:
    """The recipe table (one row per recipe, one column per slot; default: the presets) as GitHub markdown."""
    rows = ["| recipe | " + " | ".join(SLOTS) + " | backward signs | options |", "|---" * (len(SLOTS) + 3) + "|"]
    for name in recipes or tuple(r.name for r in _PRESETS):  # the presets, not recipes registered since
        r = Recipe.named(name)
        signs = "one per backward" if r.share_backward_signs else "one per GEMM"
        if not any(r.spec(s) is not None and r.spec(s).random_signs for s in SLOTS):
            signs = "-"
        rows.append(f"| `{name}` | " + " | ".join(r.describe(s) for s in SLOTS) + f" | {signs} | {r.options_str()} |")
    return "\n".join(rows)


_RTN = QuantSpec.named("rtn")
_RTN_2D = QuantSpec.named("rtn_2d")
_RTN_4OVER6 = QuantSpec.named("rtn_4over6")
_SR_TE = QuantSpec.named("sr_te")
_RHT16_SR_TE = QuantSpec.named("rht16_sr_te")
_RHT16_RTN_TE = QuantSpec.named("rht16_rtn_te")
_MS_EDEN = QuantSpec.named("ms_eden")
_DB_RTN = QuantSpec.named("double_block_rtn")
_DB_RHT16_SR = QuantSpec.named("double_block_rht16_sr")

# TetraJet-v2: double-block scales, RTN forward, random-sign RHT-16 + unbiased SR on all four backward
# operands, W^T and X^T re-quantized from the dequantized forward; separate signs for dgrad and wgrad.
# TransformerEngine NVFP4BlockScaling: 1x16 RTN activations, 16x16 RTN weights (fprop and dgrad share
# them), SR on both gradient copies, the fixed-sign RHT-16 on both wgrad operands.
_NVIDIA = Recipe("nvidia", _RTN, _RTN_2D, _SR_TE, _RTN_2D, _RHT16_SR_TE, _RHT16_RTN_TE)
_TETRAJET_V2 = Recipe(
    "tetrajet_v2",
    _DB_RTN,
    _DB_RTN,
    _DB_RHT16_SR,
    _DB_RHT16_SR,
    _DB_RHT16_SR,
    _DB_RHT16_SR,
    dgrad_w_source="forward",
    wgrad_x_source="forward",
)  # fmt: skip

_PRESETS = (
    _NVIDIA,
    _TETRAJET_V2,
    # TetraJet-v2 with OutControl: the 10 % input channels of largest L2 norm over training forwards 500-549
    # run in MXFP8 in the forward and wgrad GEMMs from then on (OsciReset is the separate optimizer hook).
    dataclasses.replace(_TETRAJET_V2, name="tetrajet_v2_full", outliers=OutControl(ratio=0.1, start=500, window=50)),
    # Quartet II: 4/6 RTN 1x16 forward on X and W; MS-EDEN (RHT-128) on the four backward operands, W^T
    # and X^T re-quantized from the saved forward quantization; one fresh sign vector per backward call.
    Recipe(
        "quartet_ii",
        _RTN_4OVER6,
        _RTN_4OVER6,
        _MS_EDEN,
        _MS_EDEN,
        _MS_EDEN,
        _MS_EDEN,
        dgrad_w_source="forward",
        wgrad_x_source="forward",
        share_backward_signs=True,
    ),  # fmt: skip
    # Four Over Six on NVIDIA's recipe: 4/6 on forward X and W (1x16 weights, so W^T is quantized again for
    # dgrad, also with 4/6). Gradients keep TE's SR: SR combined with 4/6 is biased, so this preset never
    # uses it, and TE forbids 4/6 with RHT, so the wgrad X^T stays RHT-16 RTN.
    Recipe("four_over_six", _RTN_4OVER6, _RTN_4OVER6, _SR_TE, _RTN_4OVER6, _RHT16_SR_TE, _RHT16_RTN_TE),
    # CHON: NVIDIA's recipe with the Hot-Channel Patch, and post-QK protection: the attention output projection
    # (o_proj, out_proj, GPT-2's attn.c_proj, attn.proj as in the demo's GPT and timm's ViT) stays bf16. k and
    # period are this library's (not recovered).
    dataclasses.replace(
        _NVIDIA,
        name="chon",
        outliers=HotChannelPatch(),
        keep_high_precision=_NVIDIA.keep_high_precision + ("*.o_proj", "*.out_proj", "*.attn.c_proj", "*.attn.proj"),
    ),
    # Wang et al. (arXiv 2501.17116): E2M1 forward with exact absmax scales per token (X) and per output
    # channel (W), FP8 backward GEMMs (E5M2 dY, E4M3 copies of the FP4-simulated W and X, per-tensor
    # scales), DGE on the weight gradient, outlier clamping at 0.99 with bf16 compensation.
    Recipe(
        "fp4_dge_occ",
        RowE2M1(),
        RowE2M1(),
        FP8Tensor("e5m2"),
        FP8Tensor("e4m3"),
        FP8Tensor("e5m2"),
        FP8Tensor("e4m3"),
        dgrad_w_source="forward",
        wgrad_x_source="forward",
        dge=True,
        occ=OutlierClamping(alpha=0.99),
    ),  # fmt: skip
    # The baseline the papers show diverging: RTN everywhere, no rotation.
    Recipe("naive", _RTN, _RTN, _RTN, _RTN, _RTN, _RTN),
    # No quantization, for side-by-side runs.
    Recipe("bf16"),
)

_REGISTRY: dict[str, Recipe] = {r.name: r for r in _PRESETS}
