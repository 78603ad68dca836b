"""Saving and loading models exported by ``export_torchao_nvfp4`` (issue 13 item 8).

A checkpoint of an exported model loads into a freshly exported one bit for bit, through
``torch.save``/``torch.load(weights_only=True)``; a checkpoint that cannot fit says what to do.
CPU, weight-only path (``F.linear`` dequantizes the ``NVFP4Tensor``), small shapes.
"""

import pickle

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchao", reason="torchao is not importable")
quantize_ = pytest.importorskip("torchao.quantization").quantize_
NVFP4Tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor").NVFP4Tensor

from fp4compile.torchao_integration import (  # noqa: E402  (after the importorskip of torchao)
    NVFP4Config,
    export_torchao_nvfp4,
    load_torchao_nvfp4,
)

NVFP4_FIELDS = ("qdata", "scale", "per_tensor_scale")


def _model(seed, dtype=torch.float32, *, quantized=True, exported=True, **export_kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).to(dtype)
    if quantized:
        config = NVFP4Config()
        quantize_(model, config, filter_fn=config.filter_fn)  # the default recipe: "nvidia"
    if exported:
        export_torchao_nvfp4(model, **export_kwargs)
    return model


def _snapshot(model):
    """Every tensor of the state dict, NVFP4Tensor weights as their bytes (cloned)."""
    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, NVFP4Tensor):
            for field in NVFP4_FIELDS:
                out[f"{key}.{field}"] = getattr(value, field).clone()
        else:
            out[key] = value.clone()
    return out


def _assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key


def _assert_loaded(model, original):
    """``model`` holds ``original``'s checkpoint: same keys, same bits, same outputs."""
    assert model.state_dict().keys() == original.state_dict().keys()
    for layer in (model[0], model[2]):
        assert isinstance(layer.weight, NVFP4Tensor) and not layer.weight.requires_grad
    _assert_same_bits(_snapshot(model), _snapshot(original))
    x = torch.randn(8, 64, dtype=original[0].weight.dtype)
    with torch.no_grad():
        want, got = original(x), model(x)
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["load_state_dict", "load_state_dict_assign", "helper_path", "helper_dict"])
def test_round_trip_through_torch_save(tmp_path, dtype, how):
    original = _model(0, dtype)
    path = tmp_path / "exported.pt"
    torch.save(original.state_dict(), path)
    model = _model(1, dtype)  # other random weights, spec: the checkpoint replaces them
    assert not torch.equal(model[0].weight.qdata, original[0].weight.qdata)
    if how == "helper_path":
        registered = torch.serialization.get_safe_globals()
        result = load_torchao_nvfp4(model, path)
        assert torch.serialization.get_safe_globals() == registered  # torchao's registration is left as it was
    else:
        state_dict = torch.load(path, weights_only=True)  # torchao allow-lists NVFP4Tensor on import
        if how == "helper_dict":
            result = load_torchao_nvfp4(model, state_dict)
        else:
            result = model.load_state_dict(state_dict, assign=how.endswith("assign"))
    assert not result.missing_keys and not result.unexpected_keys
    _assert_loaded(model, original)


def test_round_trip_other_spec_and_dynamic_activation(tmp_path):
    """Any export spec loads any checkpoint of the same layout; dynamic_activation round-trips its settings."""
    original = _model(0, spec="rtn_4over6")
    path = tmp_path / "exported.pt"
    torch.save(original.state_dict(), path)
    model = _model(1)
    load_torchao_nvfp4(model, path)
    _assert_loaded(model, original)

    original = _model(0, dynamic_activation=True)
    torch.save(original.state_dict(), path)
    model = _model(1, dynamic_activation=True)
    load_torchao_nvfp4(model, path)
    assert model[0].weight.act_quant_kwargs == original[0].weight.act_quant_kwargs is not None
    _assert_same_bits(_snapshot(model), _snapshot(original))  # its FP4 GEMM needs a Blackwell GPU: bits only


def test_torch_load_before_torchao_import_and_the_helper(tmp_path):
    """The original failure: in a fresh process ``torch.load(path)`` (weights_only=True) runs before torchao's
    mx_formats registers NVFP4Tensor as a safe global. ``load_torchao_nvfp4`` allow-lists it for its own load."""
    original = _model(0)
    path = tmp_path / "exported.pt"
    torch.save(original.state_dict(), path)
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as before torchao.prototype.mx_formats is imported
    try:
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global.*NVFP4Tensor"):
            torch.load(path, weights_only=True)
        model = _model(1)
        load_torchao_nvfp4(model, path, map_location="cpu")
        assert torch.serialization.get_safe_globals() == []  # allow-listed for that call only
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)
    _assert_loaded(model, original)


def _mismatches():
    """(checkpoint, model builder, message) for each checkpoint that cannot fit the model."""
    return {
        "dtype": (
            _model(0),
            lambda: _model(1, torch.bfloat16),
            r"dtype: model torch.bfloat16, checkpoint torch.float32",
        ),
        "dynamic_activation": (
            _model(0),
            lambda: _model(1, dynamic_activation=True),
            r"dynamic_activation: model True, checkpoint False",
        ),
        "saved_before_export": (
            _model(0, exported=False),
            lambda: _model(1),
            r"'0\.weight' of the checkpoint is a plain torch.float32 tensor but the model's '0\.weight' is an "
            r"exported NVFP4Tensor: load a checkpoint saved before export into the model before export_torchao_nvfp4",
        ),
    }


@pytest.mark.parametrize("case", ["dtype", "dynamic_activation", "saved_before_export"])
def test_load_state_dict_says_what_to_do(tmp_path, case):
    """Exported layers check a checkpoint before torchao's NVFP4Tensor.copy_ (whose error prints both tensors)."""
    saved, build, message = _mismatches()[case]
    path = tmp_path / "checkpoint.pt"
    torch.save(saved.state_dict(), path)
    state_dict = torch.load(path, weights_only=True)
    for helper in (False, True):
        model = build()
        before = _snapshot(model)
        with pytest.raises(RuntimeError, match=message) as caught:
            load_torchao_nvfp4(model, path) if helper else model.load_state_dict(state_dict)
        text = str(caught.value)
        assert text.startswith("cannot load the") and "NVFP4Tensor: scale: tensor(" not in text and len(text) < 1500
        if helper:
            assert "nothing was loaded" in text and "'2.weight'" in text  # every problem, before copying anything
            _assert_same_bits(_snapshot(model), before)


@pytest.mark.parametrize("quantized", [True, False], ids=["quantized_not_exported", "plain"])
def test_helper_rejects_a_model_that_was_not_exported(tmp_path, quantized):
    """``nn.Module.load_state_dict`` of a model that was not exported fails inside torchao ("'Parameter' object has
    no attribute 'tensor_data_names'"); the helper says to export first, and copies nothing."""
    path = tmp_path / "exported.pt"
    torch.save(_model(0).state_dict(), path)
    model = _model(1, quantized=quantized, exported=False)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="nothing was loaded") as caught:
        load_torchao_nvfp4(model, path)
    text = str(caught.value)
    assert "'0.weight' of the checkpoint is an NVFP4Tensor" in text and "'2.weight' of the checkpoint" in text
    assert "export_torchao_nvfp4(model, dynamic_activation=<as when saved>)" in text
    _assert_same_bits(_snapshot(model), before)
    load_torchao_nvfp4(export_torchao_nvfp4(model) if quantized else _model(1), path)  # the fix


def test_helper_strict_and_bad_files(tmp_path):
    original = _model(0)
    state_dict = dict(original.state_dict())
    del state_dict["2.bias"]
    model = _model(1)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "2.bias"'):
        load_torchao_nvfp4(model, state_dict)
    result = load_torchao_nvfp4(_model(1), state_dict, strict=False)
    assert result.missing_keys == ["2.bias"] and not result.unexpected_keys
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(TypeError, match="not a state dict: save model.state_dict()"):
        load_torchao_nvfp4(model, path)
