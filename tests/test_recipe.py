"""Recipe presets match their sources slot by slot; bad recipes fail with clear errors."""

import pytest

from fp4compile import QuantSpec
from fp4compile.recipe import SLOTS, Recipe, markdown_table

N = QuantSpec.named


def _slots(recipe):
    return [recipe.spec(s) for s in SLOTS]


def test_nvidia_is_transformer_engine_nvfp4_block_scaling():
    r = Recipe.named("nvidia")
    assert _slots(r) == [N("rtn"), N("rtn_2d"), N("sr_te"), N("rtn_2d"), N("rht16_sr_te"), N("rht16_rtn_te")]
    assert r.dgrad_w_source == r.wgrad_x_source == "hp"
    assert r.reuses_forward_weight  # 16x16 weight scales serve fprop and dgrad


def test_tetrajet_v2_double_block_requantizes_from_forward():
    r = Recipe.named("tetrajet_v2")
    assert _slots(r)[:2] == [N("double_block_rtn")] * 2
    assert _slots(r)[2:] == [N("double_block_rht16_sr")] * 4
    assert (r.dgrad_w_source, r.wgrad_x_source, r.share_backward_signs) == ("forward", "forward", False)


def test_quartet_ii_four_over_six_forward_ms_eden_backward():
    r = Recipe.named("quartet_ii")
    assert _slots(r) == [N("rtn_4over6")] * 2 + [N("ms_eden")] * 4
    assert (r.dgrad_w_source, r.wgrad_x_source, r.share_backward_signs) == ("forward", "forward", True)


def test_four_over_six_never_combines_sr_with_four_over_six():
    r = Recipe.named("four_over_six")
    assert r.fwd_x == r.fwd_w == N("rtn_4over6") and r.fwd_w.block == "1x16"
    for slot in SLOTS:
        spec = r.spec(slot)
        assert not (spec.rounding == "sr" and spec.scale_rule == "4over6"), slot


def test_naive_and_bf16():
    assert _slots(Recipe.named("naive")) == [N("rtn")] * 6
    bf16 = Recipe.named("bf16")
    assert not bf16.quantized and _slots(bf16) == [None] * 6


def test_every_recipe_keeps_the_lm_head_in_high_precision():
    for name in Recipe.names():
        r = Recipe.named(name)
        assert r.keeps_high_precision("lm_head") and r.keeps_high_precision("model.lm_head")
        assert not r.keeps_high_precision("model.layers.0.mlp.up_proj")


def test_unknown_recipe_lists_valid_names():
    valid = "nvidia, tetrajet_v2, tetrajet_v2_full, quartet_ii"
    with pytest.raises(ValueError, match=f"unknown recipe 'nvfp4'; valid recipes: {valid}"):
        Recipe.named("nvfp4")


def test_invalid_recipes_name_the_problem():
    rtn, r16 = N("rtn"), N("rht16_rtn_te")
    with pytest.raises(ValueError, match="every slot or none"):
        Recipe("partial", rtn, rtn)
    with pytest.raises(ValueError, match="wgrad operands must share their rotation"):
        Recipe("mismatch", rtn, rtn, rtn, rtn, rtn, r16)
    with pytest.raises(ValueError, match="stochastic forward"):
        Recipe("sr_fwd", N("sr"), rtn, rtn, rtn, rtn, rtn)
    with pytest.raises(ValueError, match="dgrad_w_source='x' is not one of"):
        Recipe("bad_source", rtn, rtn, rtn, rtn, rtn, rtn, dgrad_w_source="x")
    with pytest.raises(ValueError, match="unknown slot"):
        Recipe.named("naive").spec("fwd.y")


def test_register_makes_a_custom_recipe_reachable_and_refuses_a_clash():
    rtn = N("rtn")
    custom = Recipe("test_custom_rtn", rtn, rtn, rtn, rtn, rtn, rtn, keep_high_precision=())
    assert Recipe.resolve(custom) is custom and Recipe.named("test_custom_rtn") == custom
    clash = Recipe("test_custom_rtn", rtn, rtn, N("sr"), N("sr"), rtn, rtn)
    with pytest.raises(ValueError, match="already registered"):
        clash.register()


def test_markdown_table_has_a_row_per_recipe_naming_each_slot():
    table = markdown_table(("nvidia", "quartet_ii"))
    lines = table.splitlines()
    assert lines[0] == "| recipe | fwd.x | fwd.w | dgrad.dy | dgrad.w | wgrad.dy | wgrad.x | backward signs | options |"
    assert lines[2] == "| `nvidia` | rtn | rtn_2d | sr_te | rtn_2d | rht16_sr_te | rht16_rtn_te | - | - |"
    assert "ms_eden of deq(fwd.w)" in lines[3] and lines[3].endswith("one per backward | - |")
    wang = markdown_table(("fp4_dge_occ",)).splitlines()[2]
    assert wang.startswith("| `fp4_dge_occ` | e2m1/row-absmax | e2m1/row-absmax | fp8 e5m2/tensor | fp8 e4m3/tensor ")
    assert wang.endswith("| DGE k=5 cap=3; OCC alpha=0.99 per token, bf16 compensation |")
