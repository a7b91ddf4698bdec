"""example_project: the demo workload, its settings, its factories and its web API.

The demo and the server run as subprocesses (the README's commands); the API is also checked
in-process through Litestar's test client. Redis and PostgreSQL are reached by changing
environment variables only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.orm import Session

from example_project import factories
from example_project.models import AuditEntry, Base, Customer, Product
from tests import _servers
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]


def _environment(**changes: str) -> dict[str, str]:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("DECLCACHE_", "EXAMPLE_"))
    }
    environment["PYTHONPATH"] = str(ROOT)
    environment.update(changes)
    return environment


def run_example(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "example_project", *args],
        cwd=cwd,
        env=_environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def saved_environment() -> Iterator[None]:
    """``load_settings()`` loads example_project/.env into os.environ: undo it afterwards."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("DECLCACHE_", "EXAMPLE_")):
            del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)


# -- the demo -----------------------------------------------------------------------------


def test_demo_runs_on_sqlite_and_memory(tmp_path: Path) -> None:
    result = run_example(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sqlite database, dogpile.cache.memory cache" in result.stdout
    for row in ("hit ratio", "queries saved", "median read, cached", "median read, uncached"):
        assert row in result.stdout
    saved = next(line for line in result.stdout.splitlines() if line.startswith("queries saved"))
    assert int(saved.split()[-1]) > 0


def test_demo_on_redis_and_postgres_by_environment_only(
    tmp_path: Path, redis_address: tuple[str, int], postgres_url: str, key_prefix: str
) -> None:
    host, port = redis_address
    result = run_example(
        "--reads",
        "400",
        "--customers",
        "100",
        cwd=tmp_path,
        DECLCACHE_URL=f"redis://{host}:{port}/0",
        DECLCACHE_KEY_PREFIX=key_prefix,
        EXAMPLE_DATABASE_URL=postgres_url,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert "postgresql+psycopg database, dogpile.cache.redis cache" in result.stdout
        assert "hit ratio" in result.stdout
    finally:
        engine = create_engine(postgres_url)
        Base.metadata.drop_all(engine)
        engine.dispose()
        delete_redis_keys(host, port, key_prefix)


def test_demo_help_and_serve_help(tmp_path: Path) -> None:
    demo = run_example("--help", cwd=tmp_path)
    assert demo.returncode == 0
    assert "serve" in demo.stdout
    serve = run_example("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0
    assert "--port" in serve.stdout


# -- settings and factories ---------------------------------------------------------------


@pytest.mark.usefixtures("saved_environment")
def test_settings_come_from_the_env_file_and_the_environment_wins() -> None:
    from declcache import CacheConfig, CacheManager
    from example_project.settings import load_settings

    os.environ["DECLCACHE_EXPIRATION_TIME"] = "77"
    settings = load_settings()
    assert settings.customers == 500
    config = CacheConfig.from_env()
    assert config.key_prefix == "shop:"  # from example_project/.env
    assert config.sources["key_prefix"] == "DECLCACHE_KEY_PREFIX"
    assert config.expiration_time == 77  # the environment wins over the file
    spec = CacheManager(config).spec(Product)
    assert spec is not None
    assert spec.ttl == 120
    assert spec.sources["ttl"] == "DECLCACHE_MODELS[products]"


def test_factories_build_and_create() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    assert "@example.com" in factories.CustomerFactory.build().email
    with Session(engine) as session, factories.using(session):
        customers = factories.CustomerFactory.create_batch(3)
        products = factories.ProductFactory.create_batch(2)
        entry = factories.AuditEntryFactory.create(customer_id=customers[0].id)
        session.commit()
        assert session.query(Customer).count() == 3
        assert {p.sku for p in products} <= {p.sku for p in session.query(Product)}
        assert session.get(AuditEntry, entry.id) is entry
    with pytest.raises(RuntimeError, match="needs a session"):
        factories.CustomerFactory.create()
    engine.dispose()


# -- the web API --------------------------------------------------------------------------


def check_api(client: httpx.Client | object) -> None:
    get = client.get  # type: ignore[attr-defined]
    patch = client.patch  # type: ignore[attr-defined]
    first = get("/customers/3")
    assert first.status_code == 200, first.text
    assert first.json()["email"] == "customer3@example.com"
    assert get("/customers", params={"email": "customer3@example.com"}).json()["id"] == 3

    renamed = patch("/customers/3", json={"name": "Renamed"})
    assert renamed.status_code == 200, renamed.text
    assert get("/customers/3").json()["name"] == "Renamed"
    assert get("/customers", params={"email": "customer3@example.com"}).json()["name"] == (
        "Renamed"
    )

    assert get("/customers/100000").status_code == 404
    assert get("/customers", params={"email": "nobody@example.com"}).status_code == 404
    assert get("/products/SKU-00002").json() == {
        "sku": "SKU-00002",
        "title": "Product 2",
        "price": "0.50",
    }
    assert len(get("/products", params={"limit": 5}).json()) == 5
    stats = get("/stats").json()
    assert stats["Customer"]["hits"] + stats["Customer"]["misses"] > 0
    assert stats["Customer"]["invalidations"] > 0


@pytest.mark.usefixtures("saved_environment")
def test_api_with_litestar_test_client(tmp_path: Path) -> None:
    from litestar.testing import TestClient

    from example_project.api import create_app

    app = create_app(f"sqlite:///{tmp_path / 'shop.db'}")
    with TestClient(app) as client:
        check_api(client)
        before = client.get("/stats").json()["Customer"]
        client.get("/customers/7")
        client.get("/customers/7")
        after = client.get("/stats").json()["Customer"]
        assert after["hits"] > before["hits"]  # the second read came from the cache
    assert inspect(create_engine(f"sqlite:///{tmp_path / 'shop.db'}")).has_table("customers")


@pytest.mark.usefixtures("saved_environment")
def test_api_on_redis_and_postgres_by_environment_only(
    redis_address: tuple[str, int], postgres_url: str, key_prefix: str
) -> None:
    from litestar.testing import TestClient

    from example_project.api import create_app

    host, port = redis_address
    os.environ["DECLCACHE_URL"] = f"redis://{host}:{port}/0"
    os.environ["DECLCACHE_KEY_PREFIX"] = key_prefix
    os.environ["EXAMPLE_DATABASE_URL"] = postgres_url
    try:
        with TestClient(create_app()) as client:
            check_api(client)
    finally:
        engine = create_engine(postgres_url)
        Base.metadata.drop_all(engine)
        engine.dispose()
        delete_redis_keys(host, port, key_prefix)


def _wait_for(url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.communicate()}")
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not start")


def test_serve_answers_real_http(tmp_path: Path) -> None:
    port = _servers._free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "example_project", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=_environment(EXAMPLE_DATABASE_URL=f"sqlite:///{tmp_path / 'served.db'}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(base_url, process)
        with httpx.Client(base_url=base_url, timeout=10) as client:
            check_api(client)
        stats = subprocess.run(
            [sys.executable, "-m", "declcache", "stats", f"{base_url}/stats", "--json"],
            cwd=tmp_path,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert stats.returncode == 0, stats.stderr
        customer = json.loads(stats.stdout)["Customer"]
        assert customer["invalidations"] > 0
        assert customer["hit_ratio"] is not None
    finally:
        process.terminate()
        process.wait(timeout=10)
