"""The launches and bytes of one quantized linear's compiled forward + backward, counted from its traced graph.

Run anywhere (no GPU):  python -m benchmarks.linear_traffic [--recipe nvidia] [--shape 4096x4096] [--tokens 8192]
(OutControl's recipes need a CUDA build of torch: a CPU-only build refuses their tensor indexing on fake CUDA
tensors. Recipes with outlier paths are traced past their warm-up: OutControl's channels selected, the
Hot-Channel Patch's k channels hot.)

The CUDA decomposition of ``fp4compile::linear`` and its backward is traced with fake CUDA tensors (what
AOTAutograd hands Inductor). Every node that would run as a kernel is listed with the bytes of its tensor
arguments and results: a Triton launch (its tensor arguments: inputs read, buffers written), the GEMM op, and each
remaining torch op (views excluded). Inductor fuses the torch ops with their neighbours: a reduction (the
per-tensor amax, the bias gradient) is counted as one read of the tensor its elementwise chain starts from, a copy
(cat, clone, pad, gather) as its output written and read, and the other torch ops are listed without bytes. A
model, not a measurement: it says how many bytes the quantizations move compared with bf16 ``F.linear``, whose
fwd + bwd reads and writes about
``2 * (3 * tokens * in + 3 * tokens * out + 3 * in * out)`` bytes around its three GEMMs. A stand-in Triton
driver (``launch_analysis_cpu``) lets torch analyse the launches without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter

import torch

__all__ = ["count", "main"]

_REDUCTIONS = {"amax", "sum", "max", "mean"}
_COPIES = {"cat", "clone", "constant_pad_nd", "index_select", "copy", "contiguous"}
_ELEMENTWISE = {
    "_to_copy", "bitwise_and", "__lshift__", "bitwise_left_shift", "abs", "view", "where", "ge", "mul", "neg",
    "bitwise_or", "__rshift__", "add", "eq",
}  # fmt: skip
_VIEWS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "alias",
    "as_strided", "unsqueeze", "squeeze", "detach", "empty", "new_empty", "empty_strided", "lift_fresh_copy",
    "getitem", "unbind",
}  # fmt: skip


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def _val(arg):
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_val(a) for a in arg)
    if isinstance(arg, dict):
        return {k: _val(v) for k, v in arg.items()}
    return arg


def _name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _chain_source(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor an elementwise chain ending at ``node`` starts from (what a fused reduction reads)."""
    while node.op == "call_function" and _name(node) in _ELEMENTWISE | _VIEWS:
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if not tensors:
            break
        node = max(tensors, key=lambda a: _bytes(a.meta.get("val")))
    return node


def _rows(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """``(what, bytes)`` for every node of ``gm`` that runs as a kernel; a quantize launch that writes the fp16 GEMM
    values is followed by a row ``("  of which fp16 values", bytes)``."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            name = getattr(kernel, "fn", kernel).__name__
            kwargs = node.kwargs["kwargs"]
            mode = kwargs.get("MODE")
            label = name if mode is None else f"{name}(MODE={mode}{', PLAIN_AMAX' if kwargs.get('PLAIN_AMAX') else ''})"
            if mode == 0:  # the quantizer's max|x| pass reads x only (or the stored quantization it decodes)
                reads = ("x_ptr", "src_codes_ptr", "src_scales_ptr", "src_outer_ptr")
                kwargs = {name: kwargs[name] for name in reads if name in kwargs}
            rows.append((label, _bytes(_val(kwargs))))
            if kwargs.get("values_ptr") is not None:
                rows.append(("  of which fp16 values", _bytes(_val(kwargs["values_ptr"]))))
            continue
        name = _name(node)
        if name in _VIEWS:
            continue
        if "gemm" in name:
            rows.append(("GEMM", _bytes(_val(list(node.args))) + _bytes(node.meta.get("val"))))
        elif name in _REDUCTIONS:
            rows.append((f"reduction {name}", _bytes(_chain_source(node.args[0]).meta.get("val"))))
        elif name in _COPIES:  # a materialized copy: its output written and as much read
            rows.append((f"copy {name}", 2 * _bytes(node.meta.get("val"))))
        else:
            rows.append((f"torch {name}", 0))
    return rows


def _traced_ops(recipe: str, d_in: int):
    """``(state, forward(x, w, *state), backward(dy, w, *state, *saved))`` of the recipe's op: the plain linear,
    OutControl's (channels selected) or the Hot-Channel Patch's (its k hot channels), the state graph inputs (as
    in a compiled model) made by ``state()``."""
    from fp4compile import ops
    from fp4compile.outlier_channels import HotChannelPatch, OutControl
    from fp4compile.recipe import Recipe

    control = Recipe.named(recipe).outliers
    if isinstance(control, OutControl):
        return (
            lambda: (torch.randperm(d_in, device="cuda"), torch.ones((), dtype=torch.bool, device="cuda")),
            lambda x, w, order, selected: ops.outlier_linear(x, w, None, order, selected, recipe),
            lambda dy, w, order, selected, *s: ops.outlier_linear_backward(dy, w, order, selected, *s, recipe, False),
        )
    if isinstance(control, HotChannelPatch):
        return (
            lambda: (torch.arange(min(control.k, d_in), device="cuda"),),
            lambda x, w, index: ops.hot_linear(x, w, None, index, recipe)[:-1],  # (the scores: no backward use)
            lambda dy, w, index, *s: ops.linear_backward_op(dy, w, *s, recipe, False),
        )
    return (
        lambda: (),
        lambda x, w: ops.linear(x, w, None, recipe),
        lambda dy, w, *s: ops.linear_backward_op(dy, w, *s, recipe, False),
    )


@contextlib.contextmanager
def _fake_cuda_methods():
    """``Tensor.contiguous`` as the clone it is (a CPU-only torch build refuses the method on fake CUDA tensors,
    while ``clone`` traces; the graph gets the same copy)."""
    original = torch.Tensor.contiguous

    def contiguous(self, memory_format=torch.contiguous_format):
        return self if self.is_contiguous(memory_format=memory_format) else self.clone(memory_format=memory_format)

    torch.Tensor.contiguous = contiguous
    try:
        yield
    finally:
        torch.Tensor.contiguous = original


def count(recipe: str, tokens: int, d_in: int, d_out: int) -> dict[str, list[tuple[str, int]]]:
    """The kernel rows of the traced forward and backward of one linear (no bias)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from benchmarks.launch_analysis_cpu import cuda_target_driver

    state, forward_op, backward_op = _traced_ops(recipe, d_in)
    with _fake_cuda_methods(), cuda_target_driver(), FakeTensorMode():
        x = torch.empty(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.empty(tokens, d_out, device="cuda", dtype=torch.bfloat16)
        inputs = state()
        saved = forward_op(x, w, *inputs)[1:]
    with _fake_cuda_methods(), cuda_target_driver():
        forward = make_fx(dispatch_functionalize(forward_op), tracing_mode="fake")(x, w, *inputs)
        backward = make_fx(dispatch_functionalize(backward_op), tracing_mode="fake")(dy, w, *inputs, *saved)
    return {"forward": _rows(forward), "backward": _rows(backward)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="nvidia")
    parser.add_argument("--shape", default="4096x4096", help="in x out")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    d_in, d_out = map(int, args.shape.split("x"))
    try:
        parts = count(args.recipe, args.tokens, d_in, d_out)
    except RuntimeError as error:
        if "not linked with support for cuda" not in str(error):
            raise
        raise SystemExit(
            f"linear_traffic: {args.recipe}'s op indexes its fake CUDA tensors in a way a CPU-only torch build refuses "
            f"({error}); run it with a CUDA build of torch (no GPU needed)"
        ) from None
    mib = 2**20
    total = Counter()
    for part, rows in parts.items():
        print(f"{part}:")
        for what, size in rows:
            print(f"  {what:48s} {size / mib:10.1f} MiB")
            if what.startswith("  of which"):
                total["values"] += size
                continue
            kinds = {"reduction": "graph reductions", "copy": "copies", "torch": "other torch ops", "GEMM": "GEMM"}
            kind = kinds.get(what.split(" ")[0], "kernels")  # a kernel's name and its knobs otherwise
            total[kind] += size
            total[f"{kind} launches"] += 1
    bf16 = 2 * (3 * args.tokens * d_in + 3 * args.tokens * d_out + 3 * d_in * d_out)
    print(f"{args.recipe} {args.shape}, {args.tokens} tokens, fwd + bwd:")
    for kind in ("kernels", "graph reductions", "copies", "GEMM", "other torch ops"):
        print(f"  {kind:24s} {total[kind + ' launches']:3d} launches {total[kind] / mib:10.1f} MiB")
    print(f"  of the kernels' bytes, the fp16 GEMM values they write: {total['values'] / mib:.1f} MiB")
    print(f"  bf16 F.linear fwd + bwd: 3 GEMMs, about {bf16 / mib:.1f} MiB")


if __name__ == "__main__":
    main()
