"""``python -m bench`` runs and prints its table: a tiny run, no timing asserted."""

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
    ):
        assert case in out
    assert "memory hit / memory floor, sqlite sync" in out
    assert list(tmp_path.glob("bench-*.json"))
