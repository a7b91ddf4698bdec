"""Every ```python block of README.md and docs/*.md runs, in order, one namespace per page.

Blocks of a page share one module namespace (a later block uses what an earlier one defined),
run in a temporary directory with no ``DECLCACHE_*`` variable set. A block may use top-level
``await`` (it runs in ``asyncio.run``); a block of ``>>>`` lines is a doctest whose output must
match (whitespace-insensitive).

Two HTML comments, invisible on the rendered page, apply to the next python block:

* ``<!-- docs-test: setup`` … ``-->`` holds code run before it (imports or tables a fragment
  takes for granted);
* ``<!-- docs-test: skip REASON -->`` skips it. Keep skips rare; each needs a reason.
"""

from __future__ import annotations

import ast
import asyncio
import doctest
import inspect
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import DeclarativeBase, registry

from declcache.config import SQLAlchemyAsyncConfig, SQLAlchemySyncConfig

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOKENS = re.compile(
    r"<!--\s*docs-test:\s*(?P<marker>setup|skip)(?P<body>.*?)-->"
    r"|^```python\n(?P<code>.*?)^```",
    re.DOTALL | re.MULTILINE,
)
#: Skipped blocks across all pages, at most: a skipped example is an untested one.
MAX_SKIPS = 3


@dataclass
class Block:
    page: Path
    index: int
    line: int
    code: str
    setup: list[str] = field(default_factory=list)
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.page.name}[python block {self.index}, line {self.line}]"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    blocks: list[Block] = []
    setup: list[str] = []
    skip: str | None = None
    for match in TOKENS.finditer(text):
        if match["marker"] == "setup":
            setup.append(match["body"].strip("\n"))
        elif match["marker"] == "skip":
            skip = match["body"].strip()
            assert skip, f"{page.name}: a docs-test skip needs a reason"
        else:
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(page, len(blocks) + 1, line, match["code"], setup, skip))
            setup, skip = [], None
    return blocks


def _dispose_engines(namespace: dict[str, Any]) -> list[Any]:
    """Async engines the page created: disposed in the loop that opened their connections."""
    return [value for value in namespace.values() if isinstance(value, SQLAlchemyAsyncConfig)]


def run_code(code: str, name: str, namespace: dict[str, Any]) -> None:
    compiled = compile(code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if not compiled.co_flags & inspect.CO_COROUTINE:
        exec(compiled, namespace)
        return

    async def main() -> None:
        try:
            await eval(compiled, namespace)
        finally:
            for config in _dispose_engines(namespace):
                await config.dispose()

    asyncio.run(main())


def run_doctest(block: Block, namespace: dict[str, Any]) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.code, namespace, block.name, str(block.page), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    output: list[str] = []
    runner.run(test, out=output.append, clear_globs=False)
    assert runner.failures == 0, "".join(output)


def run_page(page: Path) -> int:
    """Run the page's blocks; how many ran."""
    module = types.ModuleType(f"docs_{page.stem}")  # SQLAlchemy resolves annotations there
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    ran = 0
    try:
        for block in blocks_of(page):
            if block.skip is not None:
                continue
            for index, setup in enumerate(block.setup):
                run_code(setup, f"{block.name} setup {index + 1}", namespace)
            if block.code.lstrip().startswith(">>>"):
                run_doctest(block, namespace)
            else:
                run_code(block.code, block.name, namespace)
            ran += 1
    finally:
        for value in list(namespace.values()):
            if isinstance(value, (SQLAlchemySyncConfig, Engine)):
                value.dispose()
        registries = {
            value.registry
            for value in namespace.values()
            if isinstance(value, type)
            and issubclass(value, DeclarativeBase)
            and isinstance(getattr(value, "registry", None), registry)
        }
        for page_registry in registries:
            page_registry.dispose()  # unmap the page's models: later tests never see them
        del sys.modules[module.__name__]
    return ran


@pytest.fixture
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("DECLCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # files the examples create (app.db) land here
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
@pytest.mark.usefixtures("clean_environment")
def test_page_examples_run(page: Path) -> None:
    blocks = blocks_of(page)
    ran = run_page(page)
    assert ran == len([block for block in blocks if block.skip is None])


def test_skips_are_rare_and_explained() -> None:
    skipped = [block for page in PAGES for block in blocks_of(page) if block.skip is not None]
    assert len(skipped) <= MAX_SKIPS, [block.name for block in skipped]


def test_the_readme_has_examples() -> None:
    assert len(blocks_of(ROOT / "README.md")) >= 3
