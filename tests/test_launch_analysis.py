"""launch_analysis: torch's per-launch Triton mutation analysis runs once per distinct launch while compiling."""

import pytest
import torch
import triton
import triton.language as tl
from torch._higher_order_ops import triton_kernel_wrap
from torch._subclasses.fake_tensor import FakeTensorMode

from fp4compile.launch_analysis import launch_key, memoized_launch_analysis


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


def _autotuned():
    configs = [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})]
    return triton.autotune(configs, key=["n"])(_copy_kernel)


def test_the_key_is_what_the_analysis_sees():
    with FakeTensorMode():
        a, b = torch.empty(8, device="cuda"), torch.empty(1000, device="cuda")
        h = torch.empty(8, device="cuda", dtype=torch.float16)
    key = launch_key(_copy_kernel, {"x_ptr": a, "y_ptr": a, "n": 8, "BLOCK": 64}, {})
    assert key == launch_key(_copy_kernel, {"x_ptr": b, "y_ptr": b, "n": 8, "BLOCK": 64}, {})  # sizes unseen
    assert key != launch_key(_copy_kernel, {"x_ptr": h, "y_ptr": a, "n": 8, "BLOCK": 64}, {})  # dtypes seen
    assert key != launch_key(_copy_kernel, {"x_ptr": a, "y_ptr": a, "n": 16, "BLOCK": 64}, {})  # scalars seen
    assert key != launch_key(_copy_kernel, {"x_ptr": a, "y_ptr": a, "n": 8, "BLOCK": 128}, {})
    # torch may hand the analysis a fresh copy of an autotuner: it analyses the first config, as the key says
    assert launch_key(_autotuned(), {"x_ptr": a, "y_ptr": a, "n": 8}, {}) == launch_key(
        _autotuned(), {"x_ptr": a, "y_ptr": a, "n": 8}, {}
    )
    assert launch_key(_copy_kernel, {"x_ptr": a, "y_ptr": a, "n": 8, "BLOCK": 64}, {"x_ptr": ("stable", ())}) is None
    assert launch_key(_copy_kernel, {"x_ptr": a, "y_ptr": object(), "n": 8, "BLOCK": 64}, {}) is None


def test_each_distinct_launch_is_analysed_once_inside_the_block_and_torch_is_restored(monkeypatch):
    calls = []

    def analysis(kernel, kwargs, tma_descriptor_metadata):
        calls.append(dict(kwargs))
        return ("accesses", len(calls))

    name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(triton_kernel_wrap, n))
    monkeypatch.setattr(triton_kernel_wrap, name, analysis)
    with FakeTensorMode():
        a, b = torch.empty(8, device="cuda"), torch.empty(64, device="cuda")
    with memoized_launch_analysis() as memo:
        patched = getattr(triton_kernel_wrap, name)
        first = patched(_copy_kernel, {"x_ptr": a, "y_ptr": a, "n": 8, "BLOCK": 64}, {})
        again = patched(_copy_kernel, {"x_ptr": b, "y_ptr": b, "n": 8, "BLOCK": 64}, {})
        other = patched(_copy_kernel, {"x_ptr": a, "y_ptr": a, "n": 9, "BLOCK": 64}, {})
        unkeyed = [patched(_copy_kernel, {"x_ptr": a, "y_ptr": object(), "n": 8, "BLOCK": 64}, {}) for _ in range(2)]
        assert len(memo) == 2
    assert first == again == ("accesses", 1) and other == ("accesses", 2)
    assert unkeyed == [("accesses", 3), ("accesses", 4)]  # launches the key cannot describe: analysed every time
    assert getattr(triton_kernel_wrap, name) is analysis


def test_the_block_restores_torch_after_an_error():
    name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(triton_kernel_wrap, n))
    before = getattr(triton_kernel_wrap, name)
    with pytest.raises(RuntimeError, match="inside"):
        with memoized_launch_analysis():
            assert getattr(triton_kernel_wrap, name) is not before
            raise RuntimeError("inside")
    assert getattr(triton_kernel_wrap, name) is before
