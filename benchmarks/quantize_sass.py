"""SASS of the quantize kernel as the library launches it, compiled for sm_90 on any machine (no GPU needed).

Run:  python -m benchmarks.quantize_sass [--names rtn,ms_eden] [--requantize tetrajet_v2,quartet_ii]
      [--shapes 4x16,4x8]   (without TRITON_INTERPRET; a shape is warps x rows per program, default the library's)

Per named quantizer, its quantize pass (MODE=1, fp16 GEMM values written) and its amax pass (MODE=0, per-tensor
specs) on contiguous input and on a transposed view (read by columns; not for RHT-128); with ``--requantize``,
per recipe its wgrad X re-quantization's quantize pass reading the FP32 transpose a decode kernel wrote and
decoding the saved codes itself (``DECODE``). Printed: SASS instructions per thread, global scratch bytes (device
TMA descriptors need it; torch's static launcher refuses kernels with any), global loads, barriers,
local-memory (spill) instructions and registers per thread (``ptxas -v``). A static count: it says what a
variant asks of the SM, not how fast it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import tempfile
from typing import Optional

import triton

__all__ = ["main", "sass_counts"]


def sass_counts(
    name: str, mode: int = 1, by_columns: bool = False, decode: int = 0, warps: int = 4, rows: Optional[int] = None,
    x_dtype: str = "*bf16",
) -> dict:  # fmt: skip
    """Counts for quantizer ``name`` (a ``QuantSpec`` name) in pass ``mode``, its input read by columns (a
    transposed view) or along rows, or (``decode`` 1 or 2) decoded from a stored quantization's codes with per-tensor
    or per-block outer scales; ``warps`` warps and ``rows`` rows per program (default: the library's); ``x_dtype``
    the input's Triton pointer type."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fp4compile.format import TE_RHT_SIGN_MASK, fp32_constants, rotation_scale
    from fp4compile.kernels import quantize as q
    from fp4compile.spec import QuantSpec

    spec = QuantSpec.named(name)
    rot = spec.rotation_size
    by_columns = (by_columns or decode) and rot != 128
    halves = rot == 16 or by_columns
    per_tensor = spec.outer == "tensor"
    vmax_cap, inv_vmax = fp32_constants(spec)
    constants = dict(
        MODE=mode, ROTATION=rot, LOG_ROTATION=int(math.log2(rot)) if rot else 0,
        ROTATION_SCALE=rotation_scale(rot) if rot else 1.0,
        FIXED_SIGNS=TE_RHT_SIGN_MASK if spec.rotation == "rht16_te" else -1, BLOCK_2D=spec.block == "16x16",
        OUTER_BLOCK128=not per_tensor, ROUNDING=q._ROUNDING[spec.rounding], FOUR_OVER_SIX=spec.scale_rule == "4over6",
        WRITE_VALUES=mode == 1, NO_FMA=True, HALVES=halves, BY_COLUMNS=by_columns, VMAX_CAP=vmax_cap,
        INV_VMAX=inv_vmax, REVERSE=per_tensor and mode == 1, BM=rows or q._TILE_ROWS, BK=128,
        TILES=1, STAGES=1, DECODE=decode, PLAIN_AMAX=False,
    )  # fmt: skip
    pointers = dict(x_ptr=None if decode else x_dtype, codes_ptr="*u8", scales_ptr="*u8", outer_ptr="*fp32",
                    amax_ptr="*i32", signs_ptr="*fp32" if spec.random_signs else None,
                    seed_ptr="*i64" if spec.stochastic else None, values_ptr="*fp16" if mode == 1 else None,
                    src_codes_ptr="*u8" if decode else None, src_scales_ptr="*u8" if decode else None,
                    src_outer_ptr="*fp32" if decode else None)  # fmt: skip
    signature = {arg: kind or "constexpr" for arg, kind in pointers.items()}
    constants.update({arg: None for arg, kind in pointers.items() if kind is None})
    signature.update(dict(M="i32", K="i32", stride_xm="i32", stride_xk="i32", SRC_ROWS="i32", SRC_K="i32"))
    signature.update({arg: "constexpr" for arg in constants if arg not in signature})
    source = ASTSource(q._nvfp4_quantize_kernel, signature, constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin, tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                               capture_output=True, text=True, check=True)  # fmt: skip
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    registers = re.findall(r"Used (\d+) registers", ptxas.stdout + ptxas.stderr)
    return dict(instructions=len(lines), global_scratch=kernel.metadata.global_scratch_size,
                global_loads=sum("LDG" in line for line in lines),
                barriers=sum("BAR" in line for line in lines),
                spills=sum(("LDL" in line or "STL" in line) for line in lines),
                registers=int(registers[0]) if registers else None)  # fmt: skip


def launched_variants(name: str) -> list[tuple[int, bool]]:
    """(mode, by_columns) of the passes the library launches for quantizer ``name``."""
    from fp4compile.spec import QuantSpec

    spec = QuantSpec.named(name)
    layouts = (False,) if spec.rotation_size == 128 else (False, True)
    modes = (0, 1) if spec.outer == "tensor" else (1,)
    return [(mode, by_columns) for mode in modes for by_columns in layouts]


def _line(what: str, counts: dict) -> str:
    return f"  {what}: " + ", ".join(f"{key} {value}" for key, value in counts.items())


def main() -> None:
    from fp4compile.recipe import Recipe
    from fp4compile.spec import QuantSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", default="", help="quantizers (default: every NVFP4 one)")
    parser.add_argument("--requantize", default="", help="recipes whose wgrad X re-quantization to compile")
    parser.add_argument("--shapes", default="", help="warps x rows per program, comma-separated (e.g. 4x16,4x8)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",") if shape] or [(4, None)]
    names = [n for n in args.names.split(",") if n] or [n for n in QuantSpec.names() if QuantSpec.named(n).block in
                                                       ("1x16", "16x16")]  # fmt: skip
    print(f"Triton {triton.__version__}, sm_90 SASS of the quantize kernel")
    for warps, rows in shapes:
        shape = f"{warps} warps x {rows or 'default'} rows"
        for name in names:
            for mode, by_columns in launched_variants(name):
                what = f"{name}, {'quantize' if mode else 'amax'} pass, {'by columns' if by_columns else 'rows'}"
                print(_line(f"{what}, {shape}", sass_counts(name, mode, by_columns, False, warps, rows)))
        for recipe in (r for r in args.requantize.split(",") if r):
            spec = Recipe.named(recipe).wgrad_x
            target = next(n for n in QuantSpec.names() if QuantSpec.named(n) == spec)
            source_kind = 1 if Recipe.named(recipe).fwd_x.outer == "tensor" else 2
            for decode in (0, source_kind):
                how = "decoding the codes" if decode else "reading the FP32 transpose"
                print(_line(f"{recipe} wgrad X re-quantization ({target}), {how}, {shape}",
                            sass_counts(target, 1, True, decode, warps, rows, "*fp32")))  # fmt: skip


if __name__ == "__main__":
    main()
