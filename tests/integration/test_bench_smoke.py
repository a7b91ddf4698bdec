"""``python -m bench`` runs and prints its table: a tiny run, no timing asserted.

What is asserted is what the table claims besides times: every case ran, and the cached
cases of issue 15 (a parent and its collection, 20 parents with ``preload``) sent no SELECT.
"""

from __future__ import annotations

import shutil
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


def run_bench(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bench", *arguments]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_lockstep_tiny_run_prints_the_targets(tmp_path: Path) -> None:
    """Issue 17's lock-step mode: both workers' protocol, both modes, the untimed targets."""
    result = run_bench(
        "lockstep",
        "--runs=1",
        "--rounds=1",
        "--ops=4",
        "--backends=memory",
        "--no-peer",
        "--no-writes",
        f"--results={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for case in (
        "repo.get memory sqlite sync",
        "repo.get memory sqlite async",
        "dogpile region.get memory + fresh session",
        "dogpile region.get memory + fresh AsyncSession",
    ):
        assert cell(out, case, "SELECT/op") == "0.00"  # hits and floors: no query
    assert "The reads of issue 17, lock-step:" in out
    assert "The reads of issue 17, back to back:" in out
    for target in (
        "memory hit / floor in a fresh session (≤ 1.15x), lock-step",
        "memory hit / floor in a fresh session (≤ 1.15x), back to back",
        "async memory hit / async floor (≤ 1.2x), lock-step",
        "natural-key reads after a commit, memory",
        "inserts leave no refused fill, memory",
        "get_many overlap, 8 threads, memory",
        "get_many overlap, 8 asyncio tasks, memory",
    ):
        assert target in out
    assert list(tmp_path.glob("lockstep-*.json"))


def test_scale_tiny_run_prints_the_curves(tmp_path: Path) -> None:
    """``python -m bench scale``: entries and commits; processes when redis-server is here."""
    arguments = [
        "scale",
        "--sizes=100,300",
        "--reads=20",
        "--backends=memory",
        "--processes=1,2",
        "--keys=300",
        "--duration=0.3",
        "--changes=1,5",
        "--commits=2",
        "--no-plot",
        f"--results={tmp_path}",
    ]
    result = run_bench(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| memory | 10^2 |" in out
    assert "| memory | 300 |" in out
    if shutil.which("redis-server"):
        assert "| one Redis | 2 |" in out
        assert "| 3-master Redis Cluster | 2 |" in out
        assert "Commit cost as a transaction changes more rows" in out
    assert list(tmp_path.glob("scale-*.json"))


def cell(table: str, case: str, column: str) -> str:
    """The cell of ``case``'s row under the header ``column``, in a printed table."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = next(line for line in lines if f" {column} " in line)
    row = next(line for line in lines if line.startswith(f"| {case} "))
    names = [name.strip() for name in header.strip("|").split("|")]
    return row.strip("|").split("|")[names.index(column)].strip()
