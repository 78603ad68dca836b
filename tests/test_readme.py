"""README.md's generated parts are what the code generates.

- the recipe table is ``fp4compile.recipe.markdown_table()``;
- the quantizer table is ``fp4compile.demo.quantizer_report.markdown_table()`` and lists every named quantizer;
- the sample output of ``fp4compile quantizers`` is what the command it names prints (deterministic on the CPU);
- ``pip install`` arguments with a version comparison are quoted, here and in ``fp4compile``'s messages, so
  that they work when pasted into a shell.
"""

import pathlib
import re
import shlex

import pytest

from fp4compile.demo import quantizer_report
from fp4compile.demo.cli import main
from fp4compile.demo.quantizer_report import DISTRIBUTIONS, markdown_table
from fp4compile.recipe import markdown_table as recipe_markdown_table
from fp4compile.spec import QuantSpec

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str, text: str = "") -> str:
    """The text between ``<!-- marker -->`` and ``<!-- /marker -->`` in README.md (stripped)."""
    text = text or README.read_text()
    found = re.findall(rf"<!-- {re.escape(marker)} -->\n(.*?)\n<!-- /{re.escape(marker)} -->", text, re.S)
    assert len(found) == 1, f"README.md needs exactly one <!-- {marker} --> ... <!-- /{marker} --> block"
    return found[0].strip()


def fenced_body(block: str) -> str:
    """The body of the one fenced code block that ``block`` is."""
    found = re.fullmatch(r"```[a-z]*\n(.*)\n```", block, re.S)
    assert found, f"expected one fenced code block, got:\n{block}"
    return found.group(1)


def test_readme_recipe_table_matches_the_code():
    assert readme_block("recipe-table") == recipe_markdown_table().strip()


def test_readme_quantizer_table_matches_the_code_and_lists_every_named_quantizer():
    table = readme_block("quantizer-table")
    assert table == markdown_table()
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert listed == list(QuantSpec.names())
    assert "rht16_rtn_te" in listed  # the nvidia recipe's wgrad.x


def test_every_named_quantizer_has_a_description(monkeypatch):
    assert set(quantizer_report.DESCRIPTIONS) == set(QuantSpec.names())
    assert all(d.strip() and "\n" not in d and "|" not in d for d in quantizer_report.DESCRIPTIONS.values())
    missing = {k: v for k, v in quantizer_report.DESCRIPTIONS.items() if k != "sr_te"}
    monkeypatch.setattr(quantizer_report, "DESCRIPTIONS", missing)
    with pytest.raises(KeyError, match="'sr_te' has no description"):
        markdown_table()
    assert markdown_table(("rtn",)).splitlines()[2].startswith("| `rtn` | `1x16/tensor/cap448/rtn` | NVIDIA")


def test_readme_quantizers_sample_is_the_output_of_the_command_it_names(capsys):
    text = README.read_text()
    command = re.findall(r"Output of `(fp4compile quantizers[^`]*)`", text)
    assert len(command) == 1, "README.md should name the command that produced the quantizers sample"
    argv = shlex.split(command[0])[1:]
    sample = fenced_body(readme_block("quantizers-output", text)).splitlines()

    assert main(argv) == 0
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    assert re.fullmatch(r"\(\d+\.\d s\)", printed[-1]), printed[-1]  # the run time, left out of the README
    assert sample == printed[:-1]
    rows = {tuple(line.split()[:2]) for line in sample[3:]}
    assert rows == {(name, dist) for name in QuantSpec.names() for dist in DISTRIBUTIONS}


def unquoted_version_specifiers(text: str) -> list[str]:
    """Arguments of ``pip install`` commands in ``text`` that hold ``<`` or ``>`` and are not quoted.

    Unquoted, the shell reads ``pip install torchao>=0.18`` as ``pip install torchao`` with its output
    redirected to a file named ``=0.18``.
    """
    bad = []
    for args in re.findall(r"pip install ([^`\n]*)", text):
        for word in re.findall(r"\"[^\"]*\"|'[^']*'|\S+", args):
            if word[0] not in "\"'" and re.search(r"[<>]", word):
                bad.append(word)
    return bad


def test_pip_install_version_specifiers_are_quoted():
    assert unquoted_version_specifiers(README.read_text()) == []
    for source in sorted((README.parent / "fp4compile").rglob("*.py")):  # install hints in errors and docstrings
        assert unquoted_version_specifiers(source.read_text().replace('\\"', '"')) == [], source
    # the check itself
    assert unquoted_version_specifiers('pip install torchao>=0.18 "torch>=2.11" \'x<2\' -e ".[test]"') == [
        "torchao>=0.18"
    ]
    assert unquoted_version_specifiers("`pip install torchao >=0.18`") == [">=0.18"]
