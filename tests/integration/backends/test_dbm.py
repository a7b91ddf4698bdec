"""``dogpile.cache.dbm``: the shared suite on a dbm file, and two processes sharing one file.

A watchdog turns a wait on dogpile's file lock of over half a second into a failure: one
process never legitimately waits that long on its own file, so it is a self-deadlock.
"""

from __future__ import annotations

import contextlib
import dbm
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from declcache import CacheConfig
from tests.integration.backends._suite import BackendSuite, Raw, StoredBytesChecks

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

REPO_ROOT = Path(__file__).resolve().parents[3]


class DbmRaw(Raw):
    def __init__(self, filename: str) -> None:
        self._filename = filename

    def get(self, key: str) -> bytes | None:
        with dbm.open(self._filename, "c") as db:
            return db.get(key)

    def plant(self, key: str, value: bytes) -> None:
        with dbm.open(self._filename, "c") as db:
            db[key] = value


class LockWaitTimeout(BaseException):
    """A backend call sat in dogpile's file lock for too long: a deadlock, not a wait.

    A BaseException, so that declcache's ``except Exception`` fault handling cannot eat it.
    """


_DOGPILE_FILE_BACKEND = os.path.join("dogpile", "cache", "backends", "file.py")


def _in_file_lock(frame: FrameType | None) -> bool:
    return (
        frame is not None
        and frame.f_code.co_name == "_acquire"
        and frame.f_code.co_filename.endswith(_DOGPILE_FILE_BACKEND)
    )


@contextlib.contextmanager
def deadlock_watchdog(limit: float = 0.5) -> Iterator[None]:
    """Raise :class:`LockWaitTimeout` in the main thread when one ``flock`` waits > ``limit``.

    A single process never legitimately waits on its own dbm lock, so a long wait is the
    self-deadlock; this turns a hang into a failure.
    """
    stuck: dict[str, Any] = {"frame": None, "since": 0.0}

    def tick(_signum: int, frame: FrameType | None) -> None:
        if not _in_file_lock(frame):
            stuck["frame"] = None
        elif stuck["frame"] is not frame:
            stuck["frame"], stuck["since"] = frame, time.monotonic()
        elif time.monotonic() - stuck["since"] > limit:
            stuck["frame"] = None
            raise LockWaitTimeout(f"blocked in dogpile's file lock for more than {limit} s")

    previous = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_DBM_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from declcache import CacheConfig, CacheManager, Lookup

    filename, prefix, tag, rounds, go = sys.argv[1:6]
    stuck = {"frame": None, "since": 0.0}

    def tick(signum, frame):  # a flock held > 2 s by one call is a deadlock: exit 75
        if frame is None or frame.f_code.co_name != "_acquire":
            stuck["frame"] = None
        elif stuck["frame"] is not frame:
            stuck["frame"], stuck["since"] = frame, time.monotonic()
        elif time.monotonic() - stuck["since"] > 2.0:
            os._exit(75)

    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)

    class Base(DeclarativeBase):
        pass

    class Widget(Base):
        __tablename__ = "widgets"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

        class CacheMeta:
            ttl = 300

    manager = CacheManager(
        CacheConfig(
            backend="dogpile.cache.dbm", arguments={"filename": filename}, key_prefix=prefix
        )
    )
    manager.is_cached(Widget)  # build the region before the race starts
    deadline = time.monotonic() + 10
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    hits = misses = wrong = 0
    for i in range(int(rounds)):
        ident = i % 10
        if i % 3 == 0:
            manager.set(Widget, Widget(id=ident, name=f"{tag}-{ident}"))
        elif i % 7 == 0:
            manager.invalidate(Widget, ident)
        found = manager.get(Widget, ident)
        if found is Lookup.MISS:
            misses += 1
        elif found.id == ident and found.name in {f"a-{ident}", f"b-{ident}"}:
            hits += 1
        else:
            wrong += 1
    signal.setitimer(signal.ITIMER_REAL, 0)  # a tick during shutdown would kill the process
    stats = manager.stats()["Widget"]
    print(json.dumps({"hits": hits, "misses": misses, "wrong": wrong, "errors": stats.errors}))
    """
)


class TestDbm(StoredBytesChecks, BackendSuite):
    backend_name = "dogpile.cache.dbm"
    backend_class = "DBMBackend"

    @pytest.fixture(autouse=True)
    def _no_lock_hangs(self) -> Iterator[None]:
        """A self-deadlock on dogpile's file lock fails the test instead of hanging the run."""
        with deadlock_watchdog():
            yield

    @pytest.fixture
    def filename(self, tmp_path: Path) -> str:
        return str(tmp_path / "cache.dbm")

    @pytest.fixture
    def config(self, key_prefix: str, filename: str) -> CacheConfig:
        return CacheConfig(
            backend="dogpile.cache.dbm", arguments={"filename": filename}, key_prefix=key_prefix
        )

    @pytest.fixture
    def raw(self, filename: str) -> Raw:
        return DbmRaw(filename)

    def test_two_processes_share_one_dbm_file(
        self, filename: str, key_prefix: str, tmp_path: Path
    ) -> None:
        go = tmp_path / "go"
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", _DBM_WORKER, filename, key_prefix, tag, "150", str(go)],
                cwd=tmp_path,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for tag in ("a", "b")
        ]
        go.touch()
        results = []
        for worker in workers:
            try:
                out, err = worker.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.communicate()
                raise
            if worker.returncode == 75:
                raise LockWaitTimeout(f"a worker deadlocked on the dbm lock: {err.decode()}")
            assert worker.returncode == 0, err.decode()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))

        for result in results:
            assert result["wrong"] == 0
            assert result["errors"] == 0
            assert result["hits"] > 0
        from declcache import _payload

        with dbm.open(filename, "r") as db:  # the file is intact and every value is ours
            keys = list(db.keys())
            assert len(keys) >= 11  # ten widgets and a generation token at least
            for key in keys:
                created_at, payload = _payload.unwrap(db[key])
                assert created_at > 0
                if key.endswith((b":generation", b":list-version")):
                    assert re.fullmatch(rb"[0-9a-f]{16}", payload), payload  # a bare token
                else:
                    assert isinstance(json.loads(payload), list)
