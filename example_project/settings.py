"""The example's settings: ``EXAMPLE_*`` and ``DECLCACHE_*`` from the environment and ``.env``.

``example_project/.env`` is loaded into the environment first (variables already set win), so
``CacheConfig.from_env()`` sees its ``DECLCACHE_*`` lines too.
"""

from __future__ import annotations

from pathlib import Path

from dotenv import load_dotenv
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = Path(__file__).with_name(".env")


class ExampleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXAMPLE_", extra="ignore")

    database_url: str = ""  # empty: a SQLite file in a temporary directory
    customers: int = 500
    products: int = 50
    host: str = "127.0.0.1"
    port: int = 8000


def load_settings() -> ExampleSettings:
    """Read ``.env`` into the environment (without overriding it), then the settings."""
    load_dotenv(ENV_FILE, override=False)
    return ExampleSettings()


def async_url(url: str) -> str:
    """The async driver's URL of a sync database URL (the API uses the async repositories)."""
    for sync, async_ in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("sqlite+pysqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgresql+psycopg://", "postgresql+asyncpg://"),
        ("postgresql+psycopg2://", "postgresql+asyncpg://"),
    ):
        if url.startswith(sync):
            return async_ + url[len(sync) :]
    return url
