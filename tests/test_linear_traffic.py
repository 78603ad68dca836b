"""``benchmarks/linear_traffic.py`` (launches and bytes of one compiled linear, counted from its traced CUDA graph):
what it counts, and what the counts show about the decomposition. The trace records the kernels without running
them, so it runs in a fresh interpreter without Triton's interpreter (as ``test_decomposition.py`` does)."""

import json
import os
import subprocess
import sys

import pytest

TOKENS, D_IN, D_OUT = 256, 256, 128
_COUNT = (
    "import json, sys; from benchmarks.linear_traffic import count; "
    "print(json.dumps(count(sys.argv[1], {}, {}, {})))"
)


def _count(recipe: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = _COUNT.format(TOKENS, D_IN, D_OUT)
    found = subprocess.run([sys.executable, "-c", script, recipe], cwd=root, env=env, capture_output=True, text=True)
    if found.returncode:
        pytest.fail(found.stderr[-3000:])
    # torch analyses every recorded launch by compiling the kernel to Triton IR for sm_90; where that fails it only
    # warns (and takes every tensor argument for written), so a kernel the GPU compiler rejects would go unseen
    assert "CompilationError" not in found.stderr, found.stderr[-3000:]
    return json.loads(found.stdout.strip().splitlines()[-1])


def _names(rows):
    return [what for what, _ in rows]


def test_nvidia_linear_launches_and_writes_values_only_for_its_gemms():
    parts = _count("nvidia")
    forward, backward = _names(parts["forward"]), _names(parts["backward"])
    assert forward.count("GEMM") == 1 and backward.count("GEMM") == 2
    # forward: X and W quantized with their fp16 GEMM values; X^T (TE's RHT-16) only saved for the backward, so
    # written without values. X's two amaxes (X^T's after the RHT, X's plain) come from one amax pass over X^T,
    # before X's quantization; W's is a graph reduction
    quantized = [i for i, what in enumerate(forward) if what == "_nvfp4_quantize_kernel(MODE=1)"]
    paired = [i for i, what in enumerate(forward) if what == "_nvfp4_quantize_kernel(MODE=0, PLAIN_AMAX)"]
    assert len(quantized) == 3 and len(paired) == 1 and paired[0] < quantized[0]
    assert "_nvfp4_quantize_kernel(MODE=0)" not in forward
    with_values = [i for i in quantized if i + 1 < len(forward) and forward[i + 1] == "  of which fp16 values"]
    assert with_values == quantized[:2]
    amax = [size for what, size in parts["forward"] if what == "reduction amax"]
    assert amax == [D_OUT * D_IN * 2]  # W's per-tensor amax: one read of W
    assert dict(parts["forward"])["_nvfp4_quantize_kernel(MODE=0, PLAIN_AMAX)"] == TOKENS * D_IN * 2  # X read once
    # backward: dY's two amaxes (dY^T's after the RHT for wgrad, dY's plain for dgrad) from one pass, no reduction
    assert backward.count("_nvfp4_quantize_kernel(MODE=0, PLAIN_AMAX)") == 1 and "reduction amax" not in backward
    assert "_nvfp4_quantize_kernel(MODE=0)" not in backward


def test_hot_channel_patch_scores_without_decoding_whole_operands():
    forward = _names(_count("chon")["forward"])
    assert forward.count("_column_abs_residual_kernel") == 2 and forward.count("_residual_columns_kernel") == 2
    assert "_decode_kernel" not in forward and forward.count("GEMM") == 1


def test_backward_requantizes_saved_operands_from_their_codes():
    """W^T (dgrad) and X^T (wgrad) of tetrajet_v2 are re-quantized from the forward's saved quantizations by the
    quantize kernel reading their codes, scale bytes and outer scales: no decode launch writes an FP32 transpose
    for it to read."""
    backward = _count("tetrajet_v2")["backward"]
    names = _names(backward)
    assert "_decode_kernel" not in names and names.count("GEMM") == 2
    assert names.count("_nvfp4_quantize_kernel(MODE=1)") == 4


def test_rht128_targets_are_requantized_from_a_decoded_transpose():
    """quartet_ii's backward quantizers (MS-EDEN, RHT-128) re-quantize W^T and X^T from an FP32 transpose that a
    decode kernel writes: their decoding quantize pass spills and ran slower on an H200 (RESULTS.md, eleventh
    session; ``dispatch.requantize_transposed``)."""
    names = _names(_count("quartet_ii")["backward"])
    assert names.count("_decode_kernel") == 2 and names.count("GEMM") == 2
