"""Every code example of docs/repositories.md runs as written, in order, in one module."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "repositories.md"
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_the_repository_page_examples_run(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = PYTHON_BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 4
    module = types.ModuleType("docs_repositories")  # SQLAlchemy resolves annotations there
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for index, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[python block {index + 1}]", "exec"), module.__dict__)
