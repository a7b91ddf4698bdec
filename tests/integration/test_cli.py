"""The ``declcache`` command, driven as a subprocess: exit codes and output.

Every run gets a clean environment (no inherited ``DECLCACHE_*``), runs in the test's own
directory (so no ``.env`` leaks in) and finds ``example_project`` through ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from declcache import CacheConfig, CacheManager, Lookup
from example_project.models import Base, Customer
from tests import _servers
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
MODELS = "example_project.models"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DECLCACHE_")}
    environment["PYTHONPATH"] = str(ROOT)
    environment["COLUMNS"] = "200"
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "declcache", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def redis_env(redis_address: tuple[str, int], key_prefix: str) -> Iterator[dict[str, str]]:
    host, port = redis_address
    yield {"DECLCACHE_URL": f"redis://{host}:{port}/0", "DECLCACHE_KEY_PREFIX": key_prefix}
    delete_redis_keys(host, port, key_prefix)


@pytest.fixture
def redis_client(redis_address: tuple[str, int]) -> Iterator[redis.Redis]:
    client = redis.Redis(*redis_address)
    yield client
    client.close()


# -- help and version ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["check"], ["inspect"], ["invalidate"], ["stats"]])
def test_every_command_has_help(tmp_path: Path, command: list[str]) -> None:
    result = run_cli(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage: declcache" in result.stdout


def test_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("declcache ")


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "declcache"
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    result = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "inspect" in result.stdout


# -- check --------------------------------------------------------------------------------


def test_check_memory(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dogpile.cache.memory" in result.stdout
    assert "round trip" in result.stdout


def test_check_redis_leaves_no_key(
    tmp_path: Path, redis_env: dict[str, str], redis_client: redis.Redis, key_prefix: str
) -> None:
    result = run_cli("check", "--rounds", "3", cwd=tmp_path, env=redis_env)
    assert result.returncode == 0, result.stderr
    assert "dogpile.cache.redis" in result.stdout
    assert "from DECLCACHE_URL" in result.stdout
    assert "ok: round trip" in result.stdout
    assert list(redis_client.scan_iter(f"{key_prefix}*")) == []


def test_check_unreachable_backend_exits_1(tmp_path: Path) -> None:
    port = _servers._free_port()
    result = run_cli("check", cwd=tmp_path, env={"DECLCACHE_URL": f"redis://127.0.0.1:{port}/0"})
    assert result.returncode == 1
    assert "unreachable" in result.stderr
    assert f"port={port}" in result.stderr


def test_check_reports_an_invalid_variable(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path, env={"DECLCACHE_EXPIRATION_TIME": "-5"})
    assert result.returncode == 2
    assert "DECLCACHE_EXPIRATION_TIME" in result.stderr


def test_check_when_caching_is_disabled(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path, env={"DECLCACHE_ENABLED": "false"})
    assert result.returncode == 0
    assert "caching is disabled (DECLCACHE_ENABLED)" in result.stdout


# -- inspect ------------------------------------------------------------------------------


def test_inspect_json_says_where_each_value_came_from(tmp_path: Path) -> None:
    env = {"DECLCACHE_MODELS": '{"products": {"ttl": 45}}', "DECLCACHE_SERIALIZER": "msgpack"}
    result = run_cli("inspect", MODELS, "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"AuditEntry", "Customer", "Product"}

    customer = rows["Customer"]
    assert customer["cached"] is True
    assert customer["ttl"] == 300
    assert customer["sources"]["ttl"] == "CachedTimestamps.CacheMeta"
    assert customer["key_fields"] == [["id"], ["email"]]
    assert customer["sources"]["key_fields"] == "Customer.CacheMeta"
    assert customer["serializer"] == "msgpack"
    assert customer["sources"]["serializer"] == "DECLCACHE_SERIALIZER"
    assert len(customer["fingerprint"]) == 12

    product = rows["Product"]
    assert product["ttl"] == 45
    assert product["sources"]["ttl"] == "DECLCACHE_MODELS[products]"
    assert product["key_fields"] == [["sku"]]

    audit = rows["AuditEntry"]
    assert audit["cached"] is False
    assert audit["sources"]["enabled"] == "AuditEntry.CacheMeta"


def test_inspect_table(tmp_path: Path) -> None:
    env = {"DECLCACHE_MODELS": '{"products": {"ttl": 45}}'}
    result = run_cli("inspect", MODELS, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    for text in ("Customer", "Product", "AuditEntry", "CachedTimestamps.CacheMeta", "id | email"):
        assert text in result.stdout
    assert "DECLCACHE_MODELS[products]" in result.stdout  # printed as text, not as markup


def test_inspect_an_override_naming_no_model_exits_2(tmp_path: Path) -> None:
    env = {"DECLCACHE_MODELS": '{"products": {"ttl": 45}, "prodcts": {"ttl": 5}}'}
    result = run_cli("inspect", MODELS, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "DECLCACHE_MODELS[prodcts] names no model of" in result.stderr
    assert "products" in result.stderr  # the names it could have meant
    assert "[products]" not in result.stderr


def test_check_unknown_backend_exits_2(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path, env={"DECLCACHE_BACKEND": "dogpile.cache.nope"})
    assert result.returncode == 2
    assert "DECLCACHE_BACKEND: unknown dogpile backend" in result.stderr


def test_inspect_a_model_without_cache_meta(tmp_path: Path) -> None:
    (tmp_path / "plain_models.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

            class Base(DeclarativeBase): ...

            class Note(Base):
                __tablename__ = "notes"
                id: Mapped[int] = mapped_column(primary_key=True)
            """
        )
    )
    result = run_cli("inspect", "plain_models", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"model": "Note", "table": "notes", "cached": False, "why": "no CacheMeta"}
    ]


def test_inspect_bad_cache_meta_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken_models.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

            class Base(DeclarativeBase): ...

            class Broken(Base):
                __tablename__ = "broken"
                id: Mapped[int] = mapped_column(primary_key=True)

                class CacheMeta:
                    ttl = -1
            """
        )
    )
    result = run_cli("inspect", "broken_models", cwd=tmp_path)
    assert result.returncode == 2
    assert "Broken.CacheMeta.ttl" in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_unimportable_module_exits_2(tmp_path: Path) -> None:
    result = run_cli("inspect", "no_such_module_here", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot import 'no_such_module_here'" in result.stderr


# -- invalidate ---------------------------------------------------------------------------


def _warm(config: CacheConfig) -> CacheManager:
    """A manager with customers 1 and 2 cached (by id and by email)."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            Customer(id=i, email=f"c{i}@example.com", name=f"Customer {i}") for i in (1, 2)
        )
        session.commit()
        manager = CacheManager(config)
        assert manager.set_many(Customer, session.query(Customer).all()) == 2
    engine.dispose()
    return manager


def test_invalidate_one_entity_on_redis(
    tmp_path: Path, redis_env: dict[str, str], redis_address: tuple[str, int], key_prefix: str
) -> None:
    host, port = redis_address
    config = CacheConfig(backend="dogpile.cache.redis", key_prefix=key_prefix,
                         arguments={"host": host, "port": port, "db": 0})  # fmt: skip
    manager = _warm(config)
    assert manager.get(Customer, 1) is not Lookup.MISS

    result = run_cli("invalidate", MODELS, "Customer", "1", cwd=tmp_path, env=redis_env)
    assert result.returncode == 0, result.stderr
    assert "invalidated 1 key(s) of Customer" in result.stdout
    assert manager.get(Customer, 1) is Lookup.MISS
    assert manager.get(Customer, {"email": "c1@example.com"}) is Lookup.MISS
    assert manager.get(Customer, 2) is not Lookup.MISS

    result = run_cli(
        "invalidate", MODELS, "customers", "email=c2@example.com", cwd=tmp_path, env=redis_env
    )
    assert result.returncode == 0, result.stderr
    assert manager.get(Customer, 2) is Lookup.MISS


def test_invalidate_whole_model_on_redis(
    tmp_path: Path, redis_env: dict[str, str], redis_address: tuple[str, int], key_prefix: str
) -> None:
    host, port = redis_address
    config = CacheConfig(backend="dogpile.cache.redis", key_prefix=key_prefix,
                         arguments={"host": host, "port": port, "db": 0})  # fmt: skip
    manager = _warm(config)
    result = run_cli("invalidate", MODELS, "Customer", cwd=tmp_path, env=redis_env)
    assert result.returncode == 0, result.stderr
    assert "every cached entity and list of Customer" in result.stdout
    assert manager.get_many(Customer, [1, 2]) == [Lookup.MISS, Lookup.MISS]


def test_invalidate_errors(tmp_path: Path) -> None:
    unknown = run_cli("invalidate", MODELS, "Nope", "1", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "no model named 'Nope'" in unknown.stderr
    assert "Customer" in unknown.stderr

    bad_key = run_cli("invalidate", MODELS, "Customer", "name=x", cwd=tmp_path)
    assert bad_key.returncode == 2
    assert "is not a key of Customer" in bad_key.stderr

    bad_value = run_cli("invalidate", MODELS, "Customer", "abc", cwd=tmp_path)
    assert bad_value.returncode == 2
    assert "'abc' is not a valid key of Customer" in bad_value.stderr

    not_cached = run_cli("invalidate", MODELS, "AuditEntry", "1", cwd=tmp_path)
    assert not_cached.returncode == 0
    assert "AuditEntry is not cached" in not_cached.stdout


def test_invalidate_unreachable_backend_exits_1(tmp_path: Path) -> None:
    env = {"DECLCACHE_URL": f"redis://127.0.0.1:{_servers._free_port()}/0"}
    result = run_cli("invalidate", MODELS, "Customer", "1", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "did not take the invalidation" in result.stderr


# -- stats --------------------------------------------------------------------------------


def test_stats_of_the_example_workload_as_json(tmp_path: Path) -> None:
    result = run_cli("stats", "--run-example", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    customer = stats["Customer"]
    assert customer["hits"] > customer["misses"] > 0
    assert customer["hit_ratio"] == round(
        customer["hits"] / (customer["hits"] + customer["misses"]), 4
    )
    assert customer["invalidations"] > 0  # the workload's rename
    assert stats["Product"]["hits"] > 0
    assert "AuditEntry" not in stats


def test_stats_table_on_redis(tmp_path: Path, redis_env: dict[str, str]) -> None:
    result = run_cli("stats", "example_project.workload:demo_manager", cwd=tmp_path, env=redis_env)
    assert result.returncode == 0, result.stderr
    assert "dogpile.cache.redis" in result.stdout
    assert "hit ratio" in result.stdout
    assert "Customer" in result.stdout


def test_stats_of_a_module_exposing_a_manager(tmp_path: Path) -> None:
    (tmp_path / "my_app.py").write_text(
        "from declcache import CacheManager\ncache_manager = CacheManager()\n"
    )
    result = run_cli("stats", "my_app", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}


def test_stats_usage_errors(tmp_path: Path) -> None:
    neither = run_cli("stats", cwd=tmp_path)
    assert neither.returncode == 2
    assert "--run-example" in neither.stderr

    no_manager = run_cli("stats", MODELS, cwd=tmp_path)
    assert no_manager.returncode == 2
    assert "has no cache_manager or manager" in no_manager.stderr


def test_stats_of_an_unreachable_url_exits_1(tmp_path: Path) -> None:
    port = _servers._free_port()
    result = run_cli("stats", f"http://127.0.0.1:{port}/stats", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot read stats from" in result.stderr


def test_check_memcached(
    tmp_path: Path, memcached_address: tuple[str, int], key_prefix: str
) -> None:
    host, port = memcached_address
    env = {"DECLCACHE_URL": f"memcached://{host}:{port}", "DECLCACHE_KEY_PREFIX": key_prefix}
    result = run_cli("check", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "dogpile.cache.pymemcache" in result.stdout
    assert "ok: round trip" in result.stdout


def test_invalidate_by_a_composite_key_set(tmp_path: Path) -> None:
    (tmp_path / "member_models.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy import UniqueConstraint
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

            class Base(DeclarativeBase): ...

            class Membership(Base):
                __tablename__ = "memberships"
                __table_args__ = (UniqueConstraint("org_id", "slug"),)
                id: Mapped[int] = mapped_column(primary_key=True)
                org_id: Mapped[int]
                slug: Mapped[str]

                class CacheMeta:
                    key_fields = (("org_id", "slug"),)
            """
        )
    )
    ok = run_cli("invalidate", "member_models", "memberships", "org_id=7&slug=admins", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "invalidated 1 key(s) of Membership" in ok.stdout
    partial = run_cli("invalidate", "member_models", "Membership", "slug=admins", cwd=tmp_path)
    assert partial.returncode == 2
    assert "keys are id | org_id,slug" in partial.stderr
