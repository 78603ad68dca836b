"""SASS of the quantize kernel's re-quantization, reading an FP32 transpose or decoding the codes: compiled for sm_90
on any machine (no GPU needed).

Run:  python -m benchmarks.quantize_sass [--recipes tetrajet_v2,quartet_ii] [--shapes 4x16,8x16,4x8]
      (without TRITON_INTERPRET; a shape is warps x rows per program, default: the library's)

For each recipe's wgrad X quantizer (the re-quantization of the saved forward X^T), the quantize pass (MODE=1,
with GEMM values, one 128-column tile per program) is compiled twice: reading the FP32 transpose a decode kernel
wrote (``DECODE=0``, by columns), and decoding the saved codes, scale bytes and outer scales itself (``DECODE``).
Printed per variant: SASS instructions per thread, global loads, barriers, local-memory (spill) instructions and
registers per thread (``ptxas -v``). A static count: it says what each variant asks of the SM, not how fast it
runs.
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


def sass_counts(recipe: str, decode: bool, warps: int = 4, rows: Optional[int] = None) -> dict:
    """Instruction counts of the wgrad X re-quantization's quantize pass for ``recipe`` (see the module docstring),
    with ``warps`` warps and ``rows`` rows per program (default: the library's rows)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fp4compile.format import fp32_constants, rotation_scale
    from fp4compile.kernels import quantize as q
    from fp4compile.recipe import Recipe

    spec = Recipe.named(recipe).wgrad_x
    rot = spec.rotation_size
    halves = rot != 128
    per_tensor = spec.outer == "tensor"
    vmax_cap, inv_vmax = fp32_constants(spec)
    constants = dict(
        MODE=1, ROTATION=rot, LOG_ROTATION=int(math.log2(rot)) if rot else 0,
        ROTATION_SCALE=rotation_scale(rot) if rot else 1.0, FIXED_SIGNS=-1, BLOCK_2D=False,
        OUTER_BLOCK128=not per_tensor, ROUNDING=q._ROUNDING[spec.rounding], FOUR_OVER_SIX=False, WRITE_VALUES=True,
        NO_FMA=True, HALVES=halves, BY_COLUMNS=halves, VMAX_CAP=vmax_cap, INV_VMAX=inv_vmax, REVERSE=per_tensor,
        BM=rows or q._tile_rows(spec), BK=128, TILES=1, STAGES=1, DECODE=(1 if per_tensor else 2) if decode else 0,
    )  # fmt: skip
    pointers = dict(x_ptr=None if decode else "*fp32", codes_ptr="*u8", scales_ptr="*u8", outer_ptr="*fp32",
                    amax_ptr="*i32", signs_ptr="*fp32" if spec.random_signs else None,
                    seed_ptr="*i64" if spec.stochastic else None, values_ptr="*fp16",
                    src_codes_ptr="*u8" if decode else None, src_scales_ptr="*u8" if decode else None,
                    src_outer_ptr="*fp32" if decode else None)  # fmt: skip
    signature = {name: kind or "constexpr" for name, kind in pointers.items()}
    constants.update({name: None for name, kind in pointers.items() if kind is None})
    signature.update(dict(M="i32", K="i32", stride_xm="i32", stride_xk="i32", SRC_ROWS="i32", SRC_K="i32"))
    signature.update({name: "constexpr" for name in constants if name not in signature})
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
    return dict(instructions=len(lines), global_loads=sum("LDG" in line for line in lines),
                barriers=sum("BAR" in line for line in lines),
                spills=sum(("LDL" in line or "STL" in line) for line in lines),
                registers=int(registers[0]) if registers else None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="tetrajet_v2,quartet_ii")
    parser.add_argument("--shapes", default="", help="warps x rows per program, comma-separated (e.g. 4x16,4x8)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",") if shape] or [(4, None)]
    print(f"Triton {triton.__version__}, sm_90 SASS, the wgrad X re-quantization's quantize pass")
    for recipe in args.recipes.split(","):
        for warps, rows in shapes:
            for decode in (False, True):
                counts = sass_counts(recipe, decode, warps, rows)
                what = "decoding the codes" if decode else "reading the FP32 transpose"
                shape = f"{warps} warps x {rows or 'default'} rows"
                print(f"  {recipe:>12}, {shape}, {what:>26}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
