"""A planted secret never appears in CLI output or in a log record, valid config or not.

The secret is a password in ``DECLCACHE_URL``, in ``DECLCACHE_ARGUMENTS``, in
``sentinel_kwargs`` and inside a ``url`` argument, against the real Redis (which has no such
user or password, so every cache call fails to log in and is logged as a fault). Every
command's stdout and stderr is searched: ``check``, ``inspect`` (table and ``--json``) and
``stats``. Exceptions and ``repr`` are searched by ``tests/unit/test_secrets.py``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING

import pytest

from declcache import CacheConfig
from declcache.config import SQLAlchemySyncConfig
from tests.integration._repo_models import AuthorFactory, AuthorRepo, Base, reset_factories
from tests.integration.test_cli import MODELS, run_cli

if TYPE_CHECKING:
    from pathlib import Path

SECRET = f"Pw{uuid.uuid4().hex}"


def configurations(host: str, port: int) -> dict[str, dict[str, str]]:
    """``DECLCACHE_*`` variables, each holding the secret; the first four are valid.

    The first and third fault on every call (no user ``app``; Redis is no Sentinel); Redis
    accepts the second and fourth (a password for the ``default`` user, which has none, is
    ignored), so what is cached is read back.
    """
    redis = f"{host}:{port}"
    return {
        "url-password": {"DECLCACHE_URL": f"redis://app:{SECRET}@{redis}/0"},
        "arguments-password": {
            "DECLCACHE_URL": f"redis://{redis}/0",
            "DECLCACHE_ARGUMENTS": json.dumps({"password": SECRET}),
        },
        "sentinel-password": {
            "DECLCACHE_URL": f"redis+sentinel://{redis}/mymaster",
            "DECLCACHE_ARGUMENTS": json.dumps({"sentinel_kwargs": {"password": SECRET}}),
        },
        "url-argument": {
            "DECLCACHE_BACKEND": "dogpile.cache.redis",
            "DECLCACHE_ARGUMENTS": json.dumps({"url": f"redis://:{SECRET}@{redis}/0"}),
        },
        "invalid-no-host": {"DECLCACHE_URL": f"redis://:{SECRET}@/0"},
        "invalid-scheme": {"DECLCACHE_URL": f"gopher://app:{SECRET}@{redis}"},
        "invalid-sentinel": {"DECLCACHE_URL": f"redis+sentinel://:{SECRET}@{redis}"},
        "invalid-json": {"DECLCACHE_ARGUMENTS": f'{{"password": "{SECRET}"'},
        "invalid-option": {"DECLCACHE_URL": f"redis://:{SECRET}@{redis}/0?socket_timeout=abc"},
    }


COMMANDS = {
    "check": ["check", "--rounds", "1"],
    "inspect": ["inspect", MODELS],
    "inspect-json": ["inspect", MODELS, "--json"],
    "stats": ["stats", "app_stats"],
}
NAMES = list(configurations("h", 1))
FAULTING = {"url-password", "sentinel-password"}


@pytest.mark.parametrize("name", NAMES)
def test_no_command_prints_the_secret(
    name: str, redis_address: tuple[str, int], tmp_path: Path
) -> None:
    env = configurations(*redis_address)[name]
    (tmp_path / "app_stats.py").write_text(
        "from declcache import CacheConfig, CacheManager\n"
        "cache_manager = CacheManager(CacheConfig.from_env())\n"
    )
    codes = {}
    for command, args in COMMANDS.items():
        result = run_cli(*args, cwd=tmp_path, env=env)
        output = result.stdout + result.stderr
        assert SECRET not in output, f"{command}: {output}"
        assert "Traceback" not in output, f"{command}: {output}"
        codes[command] = result.returncode
    if name.startswith("invalid"):
        assert set(codes.values()) == {2}, codes  # refused at start-up, naming the variable
    else:
        assert codes["check"] == (1 if name in FAULTING else 0)
        assert codes["inspect"] == codes["inspect-json"] == codes["stats"] == 0


def test_check_names_the_user_not_the_password(
    redis_address: tuple[str, int], tmp_path: Path
) -> None:
    result = run_cli("check", cwd=tmp_path, env=configurations(*redis_address)["url-password"])

    assert result.returncode == 1
    assert "authentication failed for user 'app'" in result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("breaker_interval", [0, 1.0], ids=["no-breaker", "breaker"])
@pytest.mark.parametrize("name", NAMES[:4])
def test_faults_are_logged_without_the_secret(
    name: str,
    breaker_interval: float,
    *,
    redis_address: tuple[str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for variable, value in configurations(*redis_address)[name].items():
        monkeypatch.setenv(variable, value)
    config = CacheConfig.from_env(breaker_interval=breaker_interval)
    reset_factories()
    db = SQLAlchemySyncConfig(
        connection_string=f"sqlite:///{tmp_path}/secrets.db", cache_config=config
    )
    db.create_all(Base.metadata)
    caplog.set_level(logging.DEBUG)
    with db.get_session() as session:
        session.add_all(AuthorFactory.build_batch(2))
        session.commit()
    for _ in range(2):
        with db.get_session() as session:
            assert AuthorRepo(session=session).get(1).id == 1
    assert db.cache_manager is not None
    stats = db.cache_manager.stats()["Author"]
    assert (stats.errors > 0) == (name in FAULTING), stats
    db.dispose()

    if name in FAULTING:  # each fault was logged
        assert any(record.name.startswith("declcache") for record in caplog.records)
    for record in caplog.records:
        shown = logging.Formatter().format(record)
        assert SECRET not in shown, shown
