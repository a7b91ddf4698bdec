"""Settings (API.md §2, issue 3 point 4): ``DECLCACHE_*`` variables, ``.env``, URLs, bad input."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel

from declcache import (
    CacheConfig,
    CacheSettings,
    ConfigurationError,
    DeclCacheError,
    SettingsError,
)
from declcache.settings import Origin, OriginKind

if TYPE_CHECKING:
    from pathlib import Path

DEFAULTS = {
    "backend": "dogpile.cache.memory",
    "expiration_time": 3600,
    "arguments": {},
    "key_prefix": "dc:",
    "enabled": True,
    "deserializer": None,
    "url": None,
    "models": {},
    "memory_max_entries": 10_000,
    "max_value_bytes": 512 * 1024,
    "breaker_interval": 1.0,
    "near_cache": False,
    "near_cache_max_entries": 10_000,
    "scope": None,
    "consistency": "default",
    "strict_marker_ttl": 10.0,
}


def settings_error(excinfo: pytest.ExceptionInfo[SettingsError]) -> str:
    """The message of a SettingsError, after checking it is every kind it promises to be."""
    error = excinfo.value
    assert isinstance(error, SettingsError)
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, ValueError)
    assert isinstance(error, DeclCacheError)
    return str(error)


# -- defaults and every variable -------------------------------------------------------------


def test_without_environment_every_value_is_the_documented_default() -> None:
    config = CacheConfig.from_env()

    assert {name: getattr(config, name) for name in DEFAULTS} == DEFAULTS
    assert config.serializer_spec == CacheConfig().serializer_spec == "json"
    assert dict(config.sources) == dict.fromkeys([*DEFAULTS, "serializer"], "default")


@pytest.mark.parametrize(
    ("variable", "text", "field", "expected"),
    [
        ("DECLCACHE_ENABLED", "false", "enabled", False),
        ("DECLCACHE_ENABLED", "0", "enabled", False),
        ("DECLCACHE_ENABLED", "true", "enabled", True),
        ("DECLCACHE_BACKEND", "dogpile.cache.redis", "backend", "dogpile.cache.redis"),
        ("DECLCACHE_BACKEND", "dogpile.cache.null", "backend", "dogpile.cache.null"),
        # the memory backend (the default) reads cache_dict only: see test_every_variable_at_once
        (
            "DECLCACHE_ARGUMENTS",
            '{"cache_dict": {"k": [1]}}',
            "arguments",
            {"cache_dict": {"k": [1]}},
        ),
        ("DECLCACHE_EXPIRATION_TIME", "60", "expiration_time", 60),
        ("DECLCACHE_KEY_PREFIX", "myapp:v2:", "key_prefix", "myapp:v2:"),
        ("DECLCACHE_SERIALIZER", "msgpack", "serializer", "msgpack"),
        (
            "DECLCACHE_MODELS",
            '{"users": {"ttl": 60, "enabled": false}, "Order": {"cache_not_found": true}}',
            "models",
            {"users": {"ttl": 60, "enabled": False}, "Order": {"cache_not_found": True}},
        ),
    ],
)
def test_each_variable_is_read_and_its_source_recorded(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, field: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, text)

    config = CacheConfig.from_env()

    assert getattr(config, field) == expected
    assert config.sources[field] == variable
    others = {name: source for name, source in config.sources.items() if name != field}
    assert set(others.values()) == {"default"}


def test_every_variable_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {
        "DECLCACHE_ENABLED": "false",
        "DECLCACHE_BACKEND": "dogpile.cache.redis",
        "DECLCACHE_ARGUMENTS": '{"host": "h", "port": 6390}',
        "DECLCACHE_EXPIRATION_TIME": "42",
        "DECLCACHE_KEY_PREFIX": "app:",
        "DECLCACHE_SERIALIZER": "msgpack",
        "DECLCACHE_MODELS": '{"users": {"ttl": 7}}',
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    config = CacheConfig.from_env()

    assert (config.enabled, config.backend, dict(config.arguments)) == (
        False,
        "dogpile.cache.redis",
        {"host": "h", "port": 6390},
    )
    assert (config.expiration_time, config.key_prefix, config.serializer_spec) == (
        42,
        "app:",
        "msgpack",
    )
    assert config.models == {"users": {"ttl": 7}}
    assert {config.sources[name] for name in ("enabled", "backend", "models")} == {
        "DECLCACHE_ENABLED",
        "DECLCACHE_BACKEND",
        "DECLCACHE_MODELS",
    }
    assert config.sources["url"] == "default"


def test_cache_settings_reads_the_same_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_BACKEND", "dogpile.cache.null")
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", "15")

    settings = CacheSettings()

    assert (settings.backend, settings.expiration_time, settings.key_prefix) == (
        "dogpile.cache.null",
        15,
        "dc:",
    )


# -- .env ------------------------------------------------------------------------------------


def test_dotenv_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "DECLCACHE_BACKEND=dogpile.cache.null\n"
        "DECLCACHE_EXPIRATION_TIME=120\n"
        'DECLCACHE_MODELS={"users": {"ttl": 9}}\n',
        encoding="utf-8",
    )

    config = CacheConfig.from_env()

    assert (config.backend, config.expiration_time) == ("dogpile.cache.null", 120)
    assert config.models == {"users": {"ttl": 9}}
    assert config.sources["expiration_time"] == "DECLCACHE_EXPIRATION_TIME"
    assert config.sources["key_prefix"] == "default"


def test_environment_beats_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("DECLCACHE_KEY_PREFIX=file:\n", encoding="utf-8")
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", "env:")

    assert CacheConfig.from_env().key_prefix == "env:"


def test_invalid_value_in_dotenv_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DECLCACHE_EXPIRATION_TIME=soon\n", encoding="utf-8")

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert "DECLCACHE_EXPIRATION_TIME" in settings_error(excinfo)
    assert excinfo.value.setting == "DECLCACHE_EXPIRATION_TIME"


# -- explicit arguments ------------------------------------------------------------------------


def test_explicit_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", "60")
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", "env:")
    monkeypatch.setenv("DECLCACHE_MODELS", '{"users": {"ttl": 1}}')
    monkeypatch.setenv("DECLCACHE_SERIALIZER", "msgpack")

    config = CacheConfig.from_env(
        expiration_time=5, key_prefix="explicit:", models={"users": {"ttl": 2}}
    )

    assert (config.expiration_time, config.key_prefix) == (5, "explicit:")
    assert config.models == {"users": {"ttl": 2}}
    assert config.sources["expiration_time"] == "CacheConfig(expiration_time=...)"
    assert config.sources["key_prefix"] == "CacheConfig(key_prefix=...)"
    assert config.sources["models"] == "CacheConfig(models=...)"
    assert config.sources["serializer"] == "DECLCACHE_SERIALIZER"
    assert config.sources["backend"] == "default"


def test_explicit_url_beats_the_environment_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://env-host:6379/0")

    config = CacheConfig.from_env(url="memcached://explicit-host:11211")

    assert config.backend == "dogpile.cache.pymemcache"
    assert config.arguments == {"url": ["explicit-host:11211"]}
    assert config.sources["backend"] == "CacheConfig(url=...)"


def test_from_env_rejects_an_unknown_argument() -> None:
    with pytest.raises(TypeError, match="ttl"):
        CacheConfig.from_env(ttl=5)


def test_direct_construction_records_argument_and_default_sources() -> None:
    config = CacheConfig(backend="dogpile.cache.null", key_prefix="svc:")

    assert config.sources["backend"] == "CacheConfig(backend=...)"
    assert config.sources["key_prefix"] == "CacheConfig(key_prefix=...)"
    assert config.sources["expiration_time"] == "default"


def test_with_overrides_keeps_the_other_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", "env:")

    config = CacheConfig.from_env().with_overrides(expiration_time=11)

    assert (config.expiration_time, config.key_prefix) == (11, "env:")
    assert config.sources["expiration_time"] == "CacheConfig(expiration_time=...)"
    assert config.sources["key_prefix"] == "DECLCACHE_KEY_PREFIX"


def test_config_is_frozen() -> None:
    config = CacheConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend = "dogpile.cache.null"  # type: ignore[misc]


def test_config_mappings_cannot_be_changed_after_validation() -> None:
    config = CacheConfig(
        backend="dogpile.cache.redis", arguments={"host": "a"}, models={"users": {"ttl": 5}}
    )

    with pytest.raises(TypeError):
        config.arguments["host"] = "b"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.models["users"]["ttl"] = -1  # type: ignore[index]


def test_unknown_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ttl"):
        CacheConfig(ttl=5)  # type: ignore[call-arg]


def test_config_as_a_field_of_a_pydantic_model() -> None:
    class Application(BaseModel):
        cache: CacheConfig

    config = CacheConfig(key_prefix="app:")

    assert Application(cache=config).cache is config
    from_mapping = Application.model_validate({"cache": {"key_prefix": "other:"}}).cache
    assert from_mapping.sources["key_prefix"] == "CacheConfig(key_prefix=...)"


# -- where each value came from ----------------------------------------------------------------


def test_origins_are_data_and_sources_are_rendered_from_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://h:6379/0")
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", "60")

    config = CacheConfig.from_env(key_prefix="app:")

    assert config.origins["expiration_time"] == Origin(OriginKind.ENVIRONMENT, "expiration_time")
    assert config.origins["key_prefix"] == Origin(OriginKind.ARGUMENT, "key_prefix")
    assert config.origins["enabled"] == Origin(OriginKind.DEFAULT, "enabled")
    url = Origin(OriginKind.ENVIRONMENT, "url")
    assert config.origins["backend"] == config.origins["arguments"] == url
    assert dict(config.sources) == {name: str(origin) for name, origin in config.origins.items()}
    assert (config.setting_name("backend"), config.setting_name("key_prefix")) == (
        "DECLCACHE_URL",
        "CacheConfig.key_prefix",
    )


def test_origin_kinds_are_ordered_by_precedence() -> None:
    assert OriginKind.DEFAULT < OriginKind.ENVIRONMENT < OriginKind.ARGUMENT


def test_a_value_given_is_an_argument_even_when_it_equals_the_default() -> None:
    config = CacheConfig(expiration_time=3600)

    assert config.sources["expiration_time"] == "CacheConfig(expiration_time=...)"
    assert config.sources["key_prefix"] == "default"


def test_a_variable_set_to_the_default_is_still_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", "dc:")

    assert CacheConfig.from_env().sources["key_prefix"] == "DECLCACHE_KEY_PREFIX"


def test_positional_arguments_are_arguments_too() -> None:
    config = CacheConfig("dogpile.cache.null", 60)

    assert (config.backend, config.expiration_time) == ("dogpile.cache.null", 60)
    assert config.sources["backend"] == "CacheConfig(backend=...)"
    assert config.sources["expiration_time"] == "CacheConfig(expiration_time=...)"


def test_equal_values_from_different_origins_are_equal_configs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", "app:")

    assert CacheConfig.from_env() == CacheConfig(key_prefix="app:")
    assert "origins" not in repr(CacheConfig())


def test_with_overrides_of_a_config_a_url_made_keeps_the_url_as_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://h:6379/0")

    config = CacheConfig.from_env().with_overrides(key_prefix="copy:")

    assert (config.backend, dict(config.arguments)) == (
        "dogpile.cache.redis",
        {"host": "h", "port": 6379, "db": 0},
    )
    assert config.sources["backend"] == config.sources["arguments"] == "DECLCACHE_URL"


# -- CacheSettings, generated from CacheConfig -------------------------------------------------


def test_cache_settings_has_a_variable_for_every_field_but_the_function() -> None:
    fields = {item.name for item in dataclasses.fields(CacheConfig) if item.init}
    settings = CacheSettings()

    assert set(CacheSettings.model_fields) == fields - {"deserializer"}
    assert {name: getattr(settings, name) for name in CacheSettings.model_fields} == {
        name: getattr(CacheConfig(), name) for name in CacheSettings.model_fields
    }


def test_cache_settings_only_reads_and_cache_config_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", "-5")
    monkeypatch.setenv("DECLCACHE_ARGUMENTS", '{"db": 2}')

    settings = CacheSettings()

    assert (settings.expiration_time, settings.arguments) == (-5, {"db": 2})
    assert settings.model_fields_set == {"expiration_time", "arguments"}
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()
    assert excinfo.value.setting == "DECLCACHE_EXPIRATION_TIME"


# -- backends, aliases -------------------------------------------------------------------------


def test_memcached_is_an_alias_of_pymemcache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CacheConfig(backend="dogpile.cache.memcached").backend == "dogpile.cache.pymemcache"

    monkeypatch.setenv("DECLCACHE_BACKEND", "dogpile.cache.memcached")
    assert CacheConfig.from_env().backend == "dogpile.cache.pymemcache"


def test_custom_serializer_pair_is_kept_together() -> None:
    config = CacheConfig(serializer=json.dumps, deserializer=json.loads)

    assert config.serializer_spec == (json.dumps, json.loads)


# -- DECLCACHE_URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "backend", "arguments"),
    [
        pytest.param(
            "redis://cache.internal:6380/2",
            "dogpile.cache.redis",
            {"host": "cache.internal", "port": 6380, "db": 2},
            id="redis-host-port-db",
        ),
        pytest.param(
            "redis://localhost",
            "dogpile.cache.redis",
            {"host": "localhost", "port": 6379},
            id="redis-default-port",
        ),
        pytest.param(
            "redis://app:s3cr%40t@cache.internal:6379/0",
            "dogpile.cache.redis",
            {
                "host": "cache.internal",
                "port": 6379,
                "db": 0,
                "username": "app",
                "password": "s3cr@t",
            },
            id="redis-user-password",
        ),
        pytest.param(
            "redis://:secret@cache.internal/1",
            "dogpile.cache.redis",
            {"host": "cache.internal", "port": 6379, "db": 1, "password": "secret"},
            id="redis-password-only",
        ),
        pytest.param(
            "redis://h:6379/0?distributed_lock=true&socket_timeout=0.25&lock_timeout=5",
            "dogpile.cache.redis",
            {
                "host": "h",
                "port": 6379,
                "db": 0,
                "distributed_lock": True,
                "socket_timeout": 0.25,
                "lock_timeout": 5,
            },
            id="redis-query-options",
        ),
        pytest.param(
            "redis://[::1]:6379/0",
            "dogpile.cache.redis",
            {"host": "::1", "port": 6379, "db": 0},
            id="redis-ipv6",
        ),
        pytest.param(
            "rediss://secure.internal:6380/0",
            "dogpile.cache.redis",
            {"host": "secure.internal", "port": 6380, "db": 0, "ssl": True},
            id="rediss",
        ),
        pytest.param(
            "memcached://m1:11211,m2:11212,m3",
            "dogpile.cache.pymemcache",
            {"url": ["m1:11211", "m2:11212", "m3:11211"]},
            id="memcached-several-hosts",
        ),
        pytest.param(
            "memcached://m1",
            "dogpile.cache.pymemcache",
            {"url": ["m1:11211"]},
            id="memcached-default-port",
        ),
        pytest.param(
            "file:///var/cache/app.dbm",
            "dogpile.cache.dbm",
            {"filename": "/var/cache/app.dbm"},
            id="file",
        ),
        pytest.param(
            "file:///tmp/my%20cache.dbm",
            "dogpile.cache.dbm",
            {"filename": "/tmp/my cache.dbm"},
            id="file-quoted",
        ),
        pytest.param("memory://", "dogpile.cache.memory", {}, id="memory"),
        pytest.param("null://", "dogpile.cache.null", {}, id="null"),
    ],
)
def test_url_sets_backend_and_arguments(
    monkeypatch: pytest.MonkeyPatch, url: str, backend: str, arguments: dict[str, Any]
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", url)

    config = CacheConfig.from_env()

    assert config.backend == backend
    assert dict(config.arguments) == arguments
    assert config.url == url
    assert config.sources["backend"] == config.sources["arguments"] == "DECLCACHE_URL"


def test_memcached_url_with_ipv6_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "memcached://[::1]:11211,[::1]:11212")

    assert CacheConfig.from_env().arguments == {"url": ["[::1]:11211", "[::1]:11212"]}


def test_explicit_arguments_are_merged_over_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://h:6379/0")
    monkeypatch.setenv("DECLCACHE_ARGUMENTS", '{"db": 5, "distributed_lock": true}')

    config = CacheConfig.from_env()

    assert config.arguments == {"host": "h", "port": 6379, "db": 5, "distributed_lock": True}


def test_url_with_a_contradicting_backend_names_both_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://h:6379/0")
    monkeypatch.setenv("DECLCACHE_BACKEND", "dogpile.cache.pymemcache")

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    message = settings_error(excinfo)
    assert "DECLCACHE_URL" in message
    assert "DECLCACHE_BACKEND" in message


@pytest.mark.parametrize(
    ("url", "backend"),
    [
        ("redis://h:6379/0", "dogpile.cache.redis"),
        ("memcached://m1:11211", "dogpile.cache.memcached"),
        ("memcached://m1:11211", "dogpile.cache.pymemcache"),
    ],
)
def test_url_with_an_agreeing_backend_is_accepted(
    monkeypatch: pytest.MonkeyPatch, url: str, backend: str
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", url)
    monkeypatch.setenv("DECLCACHE_BACKEND", backend)

    assert CacheConfig.from_env().backend == CacheConfig(backend=backend).backend


def test_explicit_url_beats_an_environment_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_BACKEND", "dogpile.cache.memory")

    config = CacheConfig.from_env(url="redis://h:6379/0")

    assert config.backend == "dogpile.cache.redis"


def test_explicit_backend_beats_an_environment_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://h:6379/0")

    config = CacheConfig.from_env(backend="dogpile.cache.memory")

    assert config.backend == "dogpile.cache.memory"


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        pytest.param("ftp://h/x", "unknown scheme", id="unknown-scheme"),
        pytest.param("localhost:6379", "redis://", id="no-scheme"),
        pytest.param("redis://h:abc/0", "abc", id="redis-bad-port"),
        pytest.param("redis://h/x", "'x' is not a number", id="redis-bad-db"),
        pytest.param("redis:///0", "no host", id="redis-no-host"),
        pytest.param("memcached://", "no server", id="memcached-no-host"),
        pytest.param("memcached://m1:port", "'port' is not a number", id="memcached-bad-port"),
        pytest.param("file:///", "no file name", id="file-no-name"),
    ],
)
def test_bad_url_names_the_variable(monkeypatch: pytest.MonkeyPatch, url: str, hint: str) -> None:
    monkeypatch.setenv("DECLCACHE_URL", url)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    message = settings_error(excinfo)
    assert message.startswith("DECLCACHE_URL: ")
    assert hint in message


def test_bad_url_argument_names_the_argument() -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig(url="gopher://h")

    assert settings_error(excinfo).startswith("CacheConfig.url: ")


def test_file_url_with_a_host_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "file://./cache.dbm")

    with pytest.raises(SettingsError, match="DECLCACHE_URL"):
        CacheConfig.from_env()


# -- invalid values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("DECLCACHE_EXPIRATION_TIME", "abc"),
        ("DECLCACHE_EXPIRATION_TIME", "1.5"),
        ("DECLCACHE_EXPIRATION_TIME", "-5"),
        ("DECLCACHE_EXPIRATION_TIME", "0"),
        ("DECLCACHE_EXPIRATION_TIME", ""),
        ("DECLCACHE_ENABLED", "maybe"),
        ("DECLCACHE_KEY_PREFIX", "my app:"),
        ("DECLCACHE_KEY_PREFIX", "tab\there:"),
        ("DECLCACHE_KEY_PREFIX", "caf\u00e9:"),
        ("DECLCACHE_KEY_PREFIX", "x" * 65),
        ("DECLCACHE_ARGUMENTS", "[1, 2]"),
        ("DECLCACHE_ARGUMENTS", '"host"'),
        ("DECLCACHE_MODELS", '{"users": 5}'),
        ("DECLCACHE_MODELS", '["users"]'),
        ("DECLCACHE_ARGUMENTS", "host=h"),
        ("DECLCACHE_ARGUMENTS", "{'host': 'h'}"),
        ("DECLCACHE_MODELS", '{"users": {"ttl": 5}'),
    ],
)
def test_invalid_variable_raises_settings_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    monkeypatch.setenv(variable, text)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert variable in settings_error(excinfo)
    assert excinfo.value.setting == variable


def test_key_prefix_of_64_printable_characters_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = "p" * 60 + "{#}:"
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", prefix)

    assert CacheConfig.from_env().key_prefix == prefix


@pytest.mark.parametrize("text", ["yaml", "no.such.module:fmt", "json:nope"])
def test_invalid_serializer_variable_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("DECLCACHE_SERIALIZER", text)

    with pytest.raises(SettingsError, match="DECLCACHE_SERIALIZER"):
        CacheConfig.from_env()


@pytest.mark.parametrize("text", ['{"users": {"ttl": -1}}', '{"users": {"tll": 5}}'])
def test_invalid_model_override_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("DECLCACHE_MODELS", text)

    with pytest.raises(SettingsError, match=r"DECLCACHE_MODELS\[users\]"):
        CacheConfig.from_env()


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"expiration_time": -1}, "CacheConfig.expiration_time"),
        ({"expiration_time": 0}, "CacheConfig.expiration_time"),
        ({"expiration_time": True}, "CacheConfig.expiration_time"),
        ({"expiration_time": 1.5}, "CacheConfig.expiration_time"),
        ({"expiration_time": "60"}, "CacheConfig.expiration_time"),
        ({"key_prefix": "has space:"}, "CacheConfig.key_prefix"),
        ({"key_prefix": "k" * 65}, "CacheConfig.key_prefix"),
        ({"key_prefix": "nl\n"}, "CacheConfig.key_prefix"),
        ({"key_prefix": 5}, "CacheConfig.key_prefix"),
        ({"models": {"users": 5}}, "CacheConfig.models"),
        ({"backend": ""}, "CacheConfig.backend"),
        ({"serializer": json.dumps}, "CacheConfig.deserializer"),
        ({"deserializer": json.loads}, "CacheConfig.deserializer"),
    ],
)
def test_invalid_argument_raises_settings_error_naming_it(
    arguments: dict[str, Any], name: str
) -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig(**arguments)

    assert settings_error(excinfo).startswith(f"{name}: ")


def test_serializer_function_without_deserializer_says_what_to_pass() -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env(serializer=json.dumps)

    message = settings_error(excinfo)
    assert "serializer" in message
    assert "deserializer" in message


def test_invalid_from_env_argument_names_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", "60")

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env(expiration_time=-1)

    assert settings_error(excinfo).startswith("CacheConfig.expiration_time: ")


# -- near cache ------------------------------------------------------------------------------


def test_near_cache_variables_are_read_with_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "rediss://user:pw@cache.internal:6380/2")
    monkeypatch.setenv("DECLCACHE_NEAR_CACHE", "true")
    monkeypatch.setenv("DECLCACHE_NEAR_CACHE_MAX_ENTRIES", "500")

    config = CacheConfig.from_env()

    assert (config.backend, config.near_cache, config.near_cache_max_entries) == (
        "dogpile.cache.redis",
        True,
        500,
    )
    assert config.sources["near_cache"] == "DECLCACHE_NEAR_CACHE"
    assert config.sources["near_cache_max_entries"] == "DECLCACHE_NEAR_CACHE_MAX_ENTRIES"


def test_near_cache_is_an_argument_and_an_override() -> None:
    config = CacheConfig(backend="dogpile.cache.redis", near_cache=True, near_cache_max_entries=3)

    smaller = config.with_overrides(near_cache_max_entries=2)

    assert (smaller.near_cache, smaller.near_cache_max_entries) == (True, 2)
    assert smaller.sources["near_cache_max_entries"] == "CacheConfig(near_cache_max_entries=...)"
    assert config.sources["near_cache"] == "CacheConfig(near_cache=...)"


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "null://",
        "memcached://h:11211",
        "file:///tmp/c.dbm",
        "redis+cluster://h:7000",
        "redis+sentinel://h:26379/mymaster",
    ],
)
def test_near_cache_without_a_single_redis_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", url)
    monkeypatch.setenv("DECLCACHE_NEAR_CACHE", "1")

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert excinfo.value.setting == "DECLCACHE_NEAR_CACHE"
    assert "single Redis server" in settings_error(excinfo)


def test_near_cache_argument_with_the_memory_backend_is_refused() -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig(near_cache=True)

    assert settings_error(excinfo).startswith("CacheConfig.near_cache: ")


def test_near_cache_off_or_caching_off_accepts_any_backend() -> None:
    assert CacheConfig(backend="dogpile.cache.memory", near_cache=False).near_cache is False
    assert CacheConfig(backend="dogpile.cache.memory", near_cache=True, enabled=False).near_cache


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("DECLCACHE_NEAR_CACHE", "maybe"),
        ("DECLCACHE_NEAR_CACHE_MAX_ENTRIES", "0"),
        ("DECLCACHE_NEAR_CACHE_MAX_ENTRIES", "-3"),
        ("DECLCACHE_NEAR_CACHE_MAX_ENTRIES", "many"),
    ],
)
def test_invalid_near_cache_variable_names_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", "redis://localhost:6379/0")
    monkeypatch.setenv(variable, text)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert excinfo.value.setting == variable


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"near_cache_max_entries": 0}, "CacheConfig.near_cache_max_entries"),
        ({"near_cache_max_entries": True}, "CacheConfig.near_cache_max_entries"),
        ({"near_cache_max_entries": 2.5}, "CacheConfig.near_cache_max_entries"),
        ({"near_cache": "yes"}, "CacheConfig.near_cache"),
    ],
)
def test_invalid_near_cache_argument_names_it(arguments: dict[str, Any], name: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig(backend="dogpile.cache.redis", **arguments)

    assert settings_error(excinfo).startswith(f"{name}: ")


# -- bounds of numeric settings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "text", "says"),
    [
        ("DECLCACHE_BREAKER_INTERVAL", "inf", "finite"),
        ("DECLCACHE_BREAKER_INTERVAL", "nan", "finite"),
        ("DECLCACHE_BREAKER_INTERVAL", "-1", "greater than or equal to 0"),
        ("DECLCACHE_BREAKER_INTERVAL", "3601", "less than or equal to 3600"),
        ("DECLCACHE_EXPIRATION_TIME", str(10 * 365 * 86_400 + 1), "less than or equal to"),
        ("DECLCACHE_MEMORY_MAX_ENTRIES", str(10**8 + 1), "less than or equal to"),
        ("DECLCACHE_NEAR_CACHE_MAX_ENTRIES", "0", "greater than or equal to 1"),
        ("DECLCACHE_MAX_VALUE_BYTES", str(2**29 + 1), "less than or equal to"),
    ],
)
def test_numeric_variables_are_finite_and_bounded(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, says: str
) -> None:
    monkeypatch.setenv(variable, text)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert excinfo.value.setting == variable
    assert says in settings_error(excinfo)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.5, 1e9])
def test_breaker_interval_argument_is_finite_and_bounded(value: float) -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig(breaker_interval=value)

    assert excinfo.value.setting == "CacheConfig.breaker_interval"


def test_bounds_accept_their_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLCACHE_BREAKER_INTERVAL", "3600")
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", str(10 * 365 * 86_400))

    config = CacheConfig.from_env()

    assert (config.breaker_interval, config.expiration_time) == (3600.0, 315_360_000)


# -- URL query options and backend arguments, checked against what the backend reads --------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h/0?socket_timeout=abc", "'socket_timeout': expected a number of seconds"),
        ("redis://h/0?socket_timeout=inf", "non-finite"),
        ("redis://h/0?socket_timeout=0", "above 0"),
        ("redis://h/0?socket_timeout=7200", "at most 3600"),
        ("redis://h/0?distributed_lok=true", "did you mean 'distributed_lock'?"),
        ("redis://h/0?distributed_lock=perhaps", "expected true or false"),
        ("redis://h/0?connection_pool=x", "cannot be set in a URL"),
        ("redis+sentinel://h:26379/m?sentinel_kwargs=x", "cannot be set in a URL"),
        ("memcached://h?timout=1", "did you mean 'timeout'?"),
        ("memcached://h?hashclient_retry_attempts=1.5", "whole number"),
        ("redis+cluster://h:7000?lock_timeout=-1", "above 0"),
        ("valkey://h/0?redis_expiration_time=5", "did you mean 'valkey_expiration_time'?"),
    ],
)
def test_bad_query_options_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, url: str, says: str
) -> None:
    monkeypatch.setenv("DECLCACHE_URL", url)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert excinfo.value.setting == "DECLCACHE_URL"
    assert says in settings_error(excinfo)


def test_query_options_are_converted_to_their_kinds() -> None:
    config = CacheConfig(
        url="redis://h/0?socket_timeout=0.2&distributed_lock=yes&lock_timeout=5"
        "&client_name=7&ssl_ca_certs=/etc/ca.pem&health_check_interval=30"
    )

    assert dict(config.arguments) == {
        "host": "h",
        "port": 6379,
        "db": 0,
        "socket_timeout": 0.2,
        "distributed_lock": True,
        "lock_timeout": 5.0,
        # what redis-py's connection reads goes where dogpile passes it on
        "connection_kwargs": {
            "client_name": "7",
            "ssl_ca_certs": "/etc/ca.pem",
            "health_check_interval": 30.0,
        },
    }


def test_memcached_query_options_are_converted() -> None:
    config = CacheConfig(url="memcached://h?hashclient_dead_timeout=1&hashclient_retry_attempts=0")

    assert dict(config.arguments) == {
        "url": ["h:11211"],
        "hashclient_dead_timeout": 1.0,
        "hashclient_retry_attempts": 0,
    }


@pytest.mark.parametrize(
    ("backend", "arguments", "says"),
    [
        ("dogpile.cache.redis", {"hots": "h"}, "did you mean 'host'?"),
        ("dogpile.cache.redis", {"socket_timeout": "0.5"}, "got str"),
        ("dogpile.cache.redis", {"port": 70000}, "at most 65535"),
        ("dogpile.cache.redis", {"db": True}, "got bool"),
        ("dogpile.cache.redis", {"connection_kwargs": {"socket_timeout": -1}}, "above 0"),
        ("dogpile.cache.redis", {"connection_kwargs": []}, "client arguments"),
        ("dogpile.cache.pymemcache", {"url": ["h:1"], "timeout": 0}, "above 0"),
        ("dogpile.cache.pymemcache", {"url": ["h:1"], "memcached_expire_time": -1}, "at least 0"),
        ("dogpile.cache.memory", {"max_entries": 5}, "reads cache_dict"),
        ("dogpile.cache.dbm", {"filename": 5}, "expected text"),
    ],
)
def test_bad_arguments_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, backend: str, arguments: dict[str, Any], says: str
) -> None:
    monkeypatch.setenv("DECLCACHE_BACKEND", backend)
    monkeypatch.setenv("DECLCACHE_ARGUMENTS", json.dumps(arguments))

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert excinfo.value.setting == "DECLCACHE_ARGUMENTS"
    assert says in settings_error(excinfo)


def test_unknown_client_arguments_pass_through_connection_kwargs() -> None:
    """Names redis-py reads that declcache does not list still reach the client unchecked."""
    arguments = {"connection_kwargs": {"ssl_min_version": 3, "decode_responses": False}}

    config = CacheConfig(backend="dogpile.cache.redis", arguments=arguments)

    assert dict(config.arguments) == arguments


def test_a_plugin_backend_takes_any_argument() -> None:
    config = CacheConfig(backend="someone.elses.backend", arguments={"anything": object})

    assert config.arguments["anything"] is object
