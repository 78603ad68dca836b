"""Does Triton keep a wgmma in flight in a block-scaled K loop? Compiled for sm_90 on any machine (no GPU needed).

Run:  python -m benchmarks.wgmma_waits   (without TRITON_INTERPRET)

The block-scaled GEMM scales each K step's partial product by that step's outer scales before adding it, so the
product must be complete first. Two ways to write that loop in Triton are compiled for Hopper and the
``wgmma.wait_group`` operands in their PTX printed: ``scaled`` (``acc += tl.dot(a, b) * s``, as
``kernels/gemm.py`` does) and ``carried`` (the partial product carried to the next iteration and scaled there,
after the next step's dot is issued). A ``1`` would mean a wgmma stays in flight while the previous one's product
is scaled, as the Gluon kernel (``kernels/gemm_gluon.py``) does; ``0`` alone means every wgmma is waited for.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl

__all__ = ["main", "waits"]


@triton.jit
def _loop(a_ptr, b_ptr, c_ptr, oa_ptr, ob_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          CARRIED: tl.constexpr):  # fmt: skip
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    part = tl.zeros([BM, BN], dtype=tl.float32)
    scale = tl.zeros([BM, BN], dtype=tl.float32)
    for ki in tl.range(tl.cdiv(K, BK), num_stages=3):
        a = a_desc.load([tl.program_id(0) * BM, ki * BK])
        b = b_desc.load([tl.program_id(1) * BN, ki * BK])
        s = tl.load(oa_ptr + rm * (K // BK) + ki)[:, None] * tl.load(ob_ptr + rn * (K // BK) + ki)[None, :]
        if CARRIED:
            nxt = tl.dot(a, b.T)
            acc += part * scale
            part, scale = nxt, s
        else:
            acc += tl.dot(a, b.T) * s
    acc += part * scale
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))


def waits(carried: bool, bm: int = 128, bn: int = 128, warps: int = 8) -> list[str]:
    """The ``wgmma.wait_group`` operands in the sm_90 PTX of the loop."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = dict(BM=bm, BN=bn, BK=128, CARRIED=carried)
    signature = dict(a_ptr="*fp16", b_ptr="*fp16", c_ptr="*bf16", oa_ptr="*fp32", ob_ptr="*fp32", M="i32", N="i32",
                     K="i32", **{name: "constexpr" for name in constants})  # fmt: skip
    source = ASTSource(_loop, signature, constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
    return re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", kernel.asm["ptx"])


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90 PTX, 128x128 tiles, 8 warps")
    for carried in (False, True):
        print(f"  {'carried' if carried else 'scaled':>8}: wgmma.wait_group {waits(carried)}")


if __name__ == "__main__":
    main()
