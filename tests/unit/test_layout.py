"""The README's layout table lists every module of the package, and nothing that is not there."""

from __future__ import annotations

import re

from helpers import TESTS

REPO = TESTS.parent
_ROW = re.compile(r"^\| `([a-z_/]+\.py)` \|", re.MULTILINE)


def test_the_readme_layout_table_matches_the_tree() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("### Layout") : text.index("\n## ", text.index("### Layout"))]
    listed = {
        path if path.startswith("lifecycle_dagster/") else f"lifecycle_dagster/{path}" for path in _ROW.findall(layout)
    }
    package = REPO / "lifecycle_dagster"
    modules = {
        p.relative_to(REPO).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py" or p.parent == package
    }
    assert sorted(modules - listed) == [], "modules missing from the README's layout table"
    assert sorted(listed - modules) == [], "the README's layout table lists modules that do not exist"
