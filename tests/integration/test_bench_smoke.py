"""``python -m bench`` runs and prints its table: a tiny run, no timing asserted.

What is asserted is what the table claims besides times: every case ran, and the cached
cases of issue 15 (a parent and its collection, 20 parents with ``preload``) sent no SELECT.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_run_prints_the_table(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--backends=memory",
        "--databases=sqlite",
        "--rounds=1",
        "--ops=20",
        "--no-peer",
        "--no-plot",
        "--no-extras",
        f"--results={tmp_path}",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| section" in out
    for case in (
        "session.get sqlite sync",
        "dogpile region.get memory",
        "repo.get memory sqlite sync",
        "repo.get memory sqlite async",
        "get_many(100) hit memory sqlite",
        "update+commit sqlite no listeners",
        "repo.get sqlite sync, use_cache=False",
        "get + 10 posts uncached sqlite",
        "list(20) + posts, preload, uncached sqlite",
        "list(20) + posts, lazy, uncached sqlite",
        "list(20) + posts, lazy, hit memory sqlite",
        "select(20) + posts, selectinload sqlite",
    ):
        assert case in out
    for cached in ("get + 10 posts", "list(20) + posts, preload,"):
        assert selects_per_op(out, f"{cached} hit memory sqlite") == 0.0
    assert selects_per_op(out, "get + 10 posts uncached sqlite") == 2.0  # the author, its posts
    assert "memory hit / memory floor, sqlite sync" in out
    assert "get + 10 posts: uncached / hit, memory sqlite" in out
    assert list(tmp_path.glob("bench-*.json"))


def selects_per_op(table: str, case: str) -> float:
    """The ``SELECT/op`` column of ``case``'s row in the printed table."""
    row = next(line for line in table.splitlines() if line.startswith("|") and f" {case} " in line)
    return float(row.strip("|").split("|")[-1])
