"""The README's recipe table is the one generated from ``recipe.py``."""

import pathlib
import re

from fp4compile.recipe import markdown_table

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_recipe_table_matches_the_code():
    text = README.read_text()
    found = re.search(r"<!-- recipe-table -->\n(.*?)\n<!-- /recipe-table -->", text, re.S)
    assert found, "README.md has no <!-- recipe-table --> block"
    assert found.group(1).strip() == markdown_table().strip()
