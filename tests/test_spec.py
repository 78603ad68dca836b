"""QuantSpec: the named presets, knob validation, derived properties, immutability and hashing.

The expected knobs of every preset are written out here from the comments next to
``_NAMED`` in ``fp4compile/spec.py`` (and the papers they cite), not read back from it.
"""

import dataclasses
import math

import pytest

from fp4compile import QuantSpec

HEADROOM_VMAX = 6.0 * 16.0 / 17.0

# name -> every knob, as documented next to the preset in spec.py.
PRESETS = {
    "rtn": dict(
        block="1x16", outer="tensor", cap=448, rounding="rtn", headroom=False, clip=1.0, scale_rule="max6",
        rotation="none",
    ),
    "rtn_4over6": dict(
        block="1x16", outer="tensor", cap=256, rounding="rtn", headroom=False, clip=1.0, scale_rule="4over6",
        rotation="none",
    ),
    "rtn_2d": dict(
        block="16x16", outer="tensor", cap=448, rounding="rtn", headroom=False, clip=1.0, scale_rule="max6",
        rotation="none",
    ),
    "sr": dict(
        block="1x16", outer="tensor", cap=448, rounding="sr", headroom=True, clip=1.0, scale_rule="max6",
        rotation="none",
    ),
    "sr_te": dict(
        block="1x16", outer="tensor", cap=448, rounding="sr", headroom=False, clip=1.0, scale_rule="max6",
        rotation="none",
    ),
    "rht16_sr_te": dict(
        block="1x16", outer="tensor", cap=448, rounding="sr", headroom=False, clip=1.0, scale_rule="max6",
        rotation="rht16_te",
    ),
    "ms_eden": dict(
        block="1x16", outer="tensor", cap=256, rounding="eden", headroom=True, clip=0.93, scale_rule="max6",
        rotation="rht128",
    ),
    "double_block_rtn": dict(
        block="1x16", outer="block128", cap=448, rounding="rtn", headroom=False, clip=1.0, scale_rule="max6",
        rotation="none",
    ),
    "double_block_rht16_sr": dict(
        block="1x16", outer="block128", cap=448, rounding="sr", headroom=True, clip=1.0, scale_rule="max6",
        rotation="rht16",
    ),
    "sr_4over6": dict(
        block="1x16", outer="tensor", cap=256, rounding="sr", headroom=True, clip=1.0, scale_rule="4over6",
        rotation="none",
    ),
    "rht16_rtn_te": dict(
        block="1x16", outer="tensor", cap=448, rounding="rtn", headroom=False, clip=1.0, scale_rule="max6",
        rotation="rht16_te",
    ),
}

# name -> (vmax, stochastic, rotation_size, random_signs, k_multiple, row_multiple, bytes_per_element)
DERIVED = {
    "rtn": (6.0, False, 0, False, 16, 1, 0.5625),
    "rtn_4over6": (6.0, False, 0, False, 16, 1, 0.5625),
    "rtn_2d": (6.0, False, 0, False, 16, 16, 0.5625),
    "sr": (HEADROOM_VMAX, True, 0, False, 16, 1, 0.5625),
    "sr_te": (6.0, True, 0, False, 16, 1, 0.5625),
    "rht16_sr_te": (6.0, True, 16, False, 16, 1, 0.5625),
    "ms_eden": (HEADROOM_VMAX / 0.93, True, 128, True, 128, 1, 0.5625),
    "double_block_rtn": (6.0, False, 0, False, 128, 1, 0.59375),
    "double_block_rht16_sr": (HEADROOM_VMAX, True, 16, True, 128, 1, 0.59375),
    "sr_4over6": (HEADROOM_VMAX, True, 0, False, 16, 1, 0.5625),
    "rht16_rtn_te": (6.0, False, 16, False, 16, 1, 0.5625),
}

DOCUMENTED_ORDER = (
    "rtn",
    "rtn_4over6",
    "rtn_2d",
    "sr",
    "sr_te",
    "rht16_sr_te",
    "ms_eden",
    "double_block_rtn",
    "double_block_rht16_sr",
    "sr_4over6",
    "rht16_rtn_te",
)


# ----------------------------------------------------------------------------- presets
def test_names_are_in_documentation_order():
    assert QuantSpec.names() == DOCUMENTED_ORDER
    assert isinstance(QuantSpec.names(), tuple)


@pytest.mark.parametrize("name", DOCUMENTED_ORDER)
def test_named_preset_has_documented_knobs(name):
    spec = QuantSpec.named(name)
    assert isinstance(spec, QuantSpec)
    assert dataclasses.asdict(spec) == PRESETS[name]
    # Building the preset from its knobs gives an equal spec.
    assert QuantSpec(**PRESETS[name]) == spec


@pytest.mark.parametrize("name", DOCUMENTED_ORDER)
def test_named_preset_derived_properties(name):
    spec = QuantSpec.named(name)
    vmax, stochastic, rotation_size, random_signs, k_multiple, row_multiple, bytes_per_element = DERIVED[name]
    assert spec.vmax == pytest.approx(vmax, rel=1e-15)
    assert spec.stochastic is stochastic
    assert spec.rotation_size == rotation_size
    assert spec.random_signs is random_signs
    assert spec.k_multiple == k_multiple
    assert spec.row_multiple == row_multiple
    assert spec.bytes_per_element == bytes_per_element


def test_vmax_values():
    assert QuantSpec().vmax == 6.0
    assert QuantSpec(headroom=True).vmax == pytest.approx(6 * 16 / 17, rel=1e-15)
    assert QuantSpec.named("ms_eden").vmax == pytest.approx(6 * 16 / 17 / 0.93, rel=1e-15)
    # clip without headroom: 6 / clip
    assert QuantSpec(clip=0.5).vmax == pytest.approx(12.0, rel=1e-15)


def test_named_returns_distinct_specs():
    specs = [QuantSpec.named(n) for n in QuantSpec.names()]
    assert len(set(specs)) == len(specs)


def test_default_spec_is_rtn():
    assert QuantSpec() == QuantSpec.named("rtn")


def test_short_str():
    assert QuantSpec.named("rtn").short_str() == "1x16/tensor/cap448/rtn"
    assert QuantSpec(rounding="sr", headroom=True, rotation="rht16").short_str() == "1x16/tensor/cap448/sr+hr/rht16"
    assert QuantSpec.named("ms_eden").short_str() == "1x16/tensor/cap256/eden+hr+clip0.93/rht128"
    assert QuantSpec.named("rtn_4over6").short_str() == "1x16/tensor/cap256/rtn/4over6"


# ----------------------------------------------------------------------------- unknown names
@pytest.mark.parametrize("bad", ["nope", "RTN", "", "rtn ", None, 3, ["rtn"]], ids=repr)
def test_unknown_name_raises_value_error_listing_all_names(bad):
    with pytest.raises(ValueError) as info:
        QuantSpec.named(bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in DOCUMENTED_ORDER:
        assert name in message


# ----------------------------------------------------------------------------- invalid knobs
@pytest.mark.parametrize(
    "field, value",
    [
        ("block", "8x8"),
        ("block", "16X16"),
        ("outer", "row"),
        ("outer", "block64"),
        ("cap", 512),
        ("cap", 255),
        ("cap", "448"),
        ("rounding", "rne"),
        ("rounding", "SR"),
        ("scale_rule", "max4"),
        ("scale_rule", "4/6"),
        ("rotation", "rht32"),
        ("rotation", None),
    ],
)
def test_invalid_knob_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}="):
        QuantSpec(**{field: value})


@pytest.mark.parametrize("clip", [0.0, -0.5, 1.0000001, 2.0, math.nan, math.inf])
def test_clip_outside_unit_interval_raises(clip):
    with pytest.raises(ValueError, match=r"QuantSpec\.clip"):
        QuantSpec(clip=clip)


@pytest.mark.parametrize("clip", [1.0, 0.93, 1e-6])
def test_clip_inside_unit_interval_is_accepted(clip):
    assert QuantSpec(clip=clip).clip == clip


@pytest.mark.parametrize(
    "knobs, words",
    [
        (dict(block="16x16", rounding="sr"), ["16x16", "block"]),
        (dict(block="16x16", outer="block128"), ["16x16", "block"]),
        (dict(block="16x16", rotation="rht16_te"), ["16x16", "block"]),
        (dict(block="16x16", clip=0.9), ["16x16", "block"]),
        (dict(block="16x16", cap=256, scale_rule="4over6"), ["16x16", "block"]),
        (dict(rounding="eden"), ["rounding='eden'", "rotation"]),
        (dict(rounding="eden", rotation="rht16_te"), ["rounding='eden'", "rotation"]),
        (dict(rounding="eden", rotation="rht128", cap=256, scale_rule="4over6"), ["rounding='eden'", "scale_rule"]),
        (dict(outer="block128", cap=256, scale_rule="4over6"), ["scale_rule='4over6'", "outer='tensor'"]),
        (dict(scale_rule="4over6"), ["scale_rule='4over6'", "cap=256"]),
        (dict(scale_rule="4over6", cap=448), ["scale_rule='4over6'", "cap=256"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_invalid_combination_raises_naming_the_fields(knobs, words):
    with pytest.raises(ValueError) as info:
        QuantSpec(**knobs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(rounding="eden", rotation="rht16"),
        dict(rounding="eden", rotation="rht128", cap=256, headroom=True, clip=0.93),
        dict(rotation="rht16"),
        dict(outer="block128", rounding="sr", rotation="rht128"),
        dict(block="16x16", cap=256, headroom=True),
        dict(cap=256, scale_rule="4over6", rotation="rht16"),
    ],
)
def test_valid_combinations_are_accepted(knobs):
    spec = QuantSpec(**knobs)
    for field, value in knobs.items():
        assert getattr(spec, field) == value


# ----------------------------------------------------------------------------- frozen, hashable
@pytest.mark.parametrize("field, value", [("block", "16x16"), ("cap", 256), ("clip", 0.5), ("headroom", True)])
def test_spec_is_frozen(field, value):
    spec = QuantSpec.named("rtn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, value)
    assert spec == QuantSpec()


def test_spec_is_hashable_and_equal_specs_hash_equal():
    a = QuantSpec(rounding="sr", headroom=True)
    b = QuantSpec.named("sr")
    assert a == b and a is not QuantSpec(rounding="sr", headroom=True)
    assert hash(a) == hash(b)
    table = {a: "sr"}
    assert table[b] == "sr"
    assert QuantSpec.named("sr_te") not in table
    assert len({QuantSpec.named(n) for n in QuantSpec.names()} | {QuantSpec()}) == len(DOCUMENTED_ORDER)


# ----------------------------------------------------------------------------- derived properties of hand-built specs
@pytest.mark.parametrize(
    "knobs, k_multiple",
    [
        (dict(), 16),
        (dict(rotation="rht16"), 16),
        (dict(rotation="rht16_te"), 16),
        (dict(rotation="rht128"), 128),
        (dict(outer="block128"), 128),
        (dict(outer="block128", rotation="rht16"), 128),
        (dict(block="16x16"), 16),
    ],
)
def test_k_multiple(knobs, k_multiple):
    assert QuantSpec(**knobs).k_multiple == k_multiple


def test_row_multiple():
    assert QuantSpec().row_multiple == 1
    assert QuantSpec(block="16x16").row_multiple == 16
    assert QuantSpec(outer="block128").row_multiple == 1


def test_bytes_per_element():
    # codes: 4 bits; scales: 8 bits per 16 elements; block128 adds 32 bits per 128 elements.
    assert QuantSpec().bytes_per_element == 0.5 + 1 / 16
    assert QuantSpec(block="16x16").bytes_per_element == 0.5 + 1 / 16
    assert QuantSpec(outer="block128").bytes_per_element == 0.5 + 1 / 16 + 4 / 128


@pytest.mark.parametrize("rotation, size, random_signs", [
    ("none", 0, False), ("rht16_te", 16, False), ("rht16", 16, True), ("rht128", 128, True),
])
def test_rotation_size_and_random_signs(rotation, size, random_signs):
    spec = QuantSpec(rotation=rotation)
    assert spec.rotation_size == size
    assert spec.random_signs is random_signs


@pytest.mark.parametrize("rounding, stochastic", [("rtn", False), ("sr", True), ("eden", True)])
def test_stochastic(rounding, stochastic):
    rotation = "rht16" if rounding == "eden" else "none"
    assert QuantSpec(rounding=rounding, rotation=rotation).stochastic is stochastic
