"""README.md's code examples run as written, and do what their comments say.

Each example sits between ``<!-- name -->`` markers; the test executes its code block (on the GPU when there
is one, else on the CPU, as the example itself chooses).
"""

import contextlib
import io
import json
import re
from typing import NamedTuple

import torch
from test_readme import fenced_body, readme_block

import fp4compile
from fp4compile import quantize
from fp4compile.demo.gpt import demo_batch, demo_model


def run_example(marker: str, **names) -> tuple[dict, str]:
    """Execute README's ``marker`` code block with ``names`` predefined; its namespace and its stdout."""
    code = fenced_body(readme_block(marker))
    namespace = dict(names)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"README.md <!-- {marker} -->", "exec"), namespace)
    return namespace, stdout.getvalue()


def commented_shape(code: str, attribute: str) -> tuple[str, tuple[int, ...]]:
    """The dtype and shape stated by the comment of README's ``q.<attribute>`` line, e.g. ``uint8 [256, 512]``."""
    found = re.search(rf"^q\.{attribute} +# (\w+) \[(\d+), (\d+)\]", code, re.M)
    assert found, f"no '# dtype [rows, cols]' comment on q.{attribute}"
    return found.group(1), (int(found.group(2)), int(found.group(3)))


def test_quantize_example_runs_and_its_comments_are_true():
    ns, _ = run_example("quantize-example")
    code = fenced_body(readme_block("quantize-example"))
    x, q, x_hat = ns["x"], ns["q"], ns["x_hat"]
    assert x.device.type == ("cuda" if torch.cuda.is_available() else "cpu")

    for attribute in ("codes", "scales"):
        dtype, shape = commented_shape(code, attribute)
        tensor = getattr(q, attribute)
        assert (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) == (dtype, shape)
    assert q.outer.dtype == torch.float32 and q.outer.numel() == 1  # rtn: one per-tensor scale
    per_block = re.search(r"^q\.outer +# float32: per-tensor scale, or \[(\d+), (\d+)\] per 1x128 block", code, re.M)
    assert per_block, "the q.outer comment changed; update this test"
    double_block = quantize(x, "double_block_rtn")
    assert tuple(double_block.outer.shape) == (int(per_block.group(1)), int(per_block.group(2)))

    assert x_hat.dtype == torch.bfloat16 and x_hat.shape == x.shape
    rel = ((x_hat.float() - x.float()).square().sum() / x.float().square().sum()).item()
    assert 1e-3 < rel < 3e-2  # an NVFP4 round trip: lossy, but close (README's table: ~9e-3 for rtn)
    assert torch.equal(quantize(x, "rtn").codes, q.codes)  # rtn is deterministic


def test_explain_example_runs_and_prints_the_report():
    model, batch = demo_model(), demo_batch()
    ns, printed = run_example("explain-example", model=model, batch=batch)
    assert "nvidia" in printed
    assert re.search(r"rewritten", printed, re.I), printed
    assert "lm_head" in printed  # the recipe's high-precision layer, reported as skipped


class _Output(NamedTuple):
    loss: torch.Tensor


class _LanguageModel(torch.nn.Module):
    """The demo GPT behind a Hugging Face-style call, ``model(input_ids=..., labels=...).loss``."""

    def __init__(self):
        super().__init__()
        self.gpt = demo_model()

    def forward(self, input_ids, labels):
        return _Output(self.gpt(input_ids, labels))


def test_monitor_example_runs_and_logs_every_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _LanguageModel()
    x = demo_batch(4, 32)
    batches = [{"input_ids": x, "labels": x}] * 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    names = dict(model=model, batches=batches, optimizer=optimizer, fp4compile=fp4compile, torch=torch)
    ns, _ = run_example("monitor-example", **names)
    rows = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    assert ns["monitor"].steps == 3 and {r["step"] for r in rows} == {0}  # every=100: the first step only
    assert len({(r["layer"], r["slot"]) for r in rows}) == 8 * 6  # 2 blocks x 4 linears, six slots each
