"""The fused OsciReset track kernel equals the plain-torch update bit for bit (interpreter on CPU, GPU on device)."""

import pytest
import torch
from testing import KERNEL_DEVICE

from fp4compile.kernels.osci import track_update_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 48), (3, 1000)])  # 768 and 3000 elements: a partial last block
def test_track_update_matches_the_torch_update(dtype, shape):
    g = torch.Generator().manual_seed(0)
    w, prev = (torch.randn(shape, generator=g).to(dtype).to(KERNEL_DEVICE) for _ in range(2))
    deq, deq_prev, d_q, d_w = (torch.randn(shape, generator=g).to(KERNEL_DEVICE) for _ in range(4))
    want_d_q = d_q + (deq - deq_prev).abs()
    want_d_w = d_w + (w.float() - prev.float()).abs()
    track_update_triton(w, prev, deq, deq_prev, d_q, d_w)
    assert torch.equal(d_q, want_d_q) and torch.equal(d_w, want_d_w) and torch.equal(prev, w)


def test_track_update_rejects_mismatched_inputs():
    w = torch.zeros(4, 16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="contiguous tensors of one shape"):
        track_update_triton(w, w.clone(), w.clone(), w.clone(), w.clone(), torch.zeros(4, 8, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="w and prev share a dtype"):
        track_update_triton(w, w.bfloat16(), w.clone(), w.clone(), w.clone(), w.clone())
