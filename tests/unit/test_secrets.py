"""No secret leaves the process through an exception, a repr or a message; masking itself.

Each test plants a secret of its own (a password in ``DECLCACHE_URL``, in
``DECLCACHE_ARGUMENTS``, in ``sentinel_kwargs``, in a ``url`` argument) and searches
everything a configuration mistake produces for it: the message, the exception's ``repr``,
its whole ``__cause__``/``__context__`` chain and the formatted traceback. The CLI's output and
log records are searched by ``tests/integration/test_secrets.py``.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from declcache import CacheConfig, SettingsError
from declcache._secrets import is_secret_name, mask_url, masked, redact, secrets_in
from declcache._stats import FaultLog
from declcache.backends import parse_url

if TYPE_CHECKING:
    from collections.abc import Callable

SECRET = f"Pw{uuid.uuid4().hex}"


def exception_text(error: BaseException) -> str:
    """Everything an exception shows: message, repr, traceback and its whole chain."""
    shown = []
    seen: BaseException | None = error
    while seen is not None:
        shown += [str(seen), repr(seen), *traceback.format_exception(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(shown)


# -- configurations that fail: every message and chain is searched ----------------------------

#: ``DECLCACHE_*`` variables that fail start-up, each with the secret somewhere in them.
INVALID = {
    "url-no-host": {"DECLCACHE_URL": f"redis://:{SECRET}@/0"},
    "url-unknown-scheme": {"DECLCACHE_URL": f"gopher://app:{SECRET}@h/0"},
    "url-no-scheme": {"DECLCACHE_URL": f"app:{SECRET}@h:6379"},
    "sentinel-no-service": {"DECLCACHE_URL": f"redis+sentinel://:{SECRET}@h:26379"},
    "url-bad-port": {"DECLCACHE_URL": f"redis://:{SECRET}@h:port/0"},
    "url-bad-option": {"DECLCACHE_URL": f"redis://:{SECRET}@h/0?socket_timeout=abc"},
    "url-unknown-option": {"DECLCACHE_URL": f"redis://:{SECRET}@h/0?distributed_lok=true"},
    "url-secret-option-typo": {"DECLCACHE_URL": f"redis://h/0?passwrd={SECRET}"},
    "memcached-with-password": {"DECLCACHE_URL": f"memcached://app:{SECRET}@h:11211"},
    "arguments-invalid-json": {"DECLCACHE_ARGUMENTS": f'{{"password": "{SECRET}"'},
    "arguments-not-an-object": {"DECLCACHE_ARGUMENTS": json.dumps([{"password": SECRET}])},
    "arguments-bad-value": {
        "DECLCACHE_BACKEND": "dogpile.cache.redis",
        "DECLCACHE_ARGUMENTS": json.dumps({"password": SECRET, "port": "abc"}),
    },
    "arguments-password-of-wrong-type": {
        "DECLCACHE_BACKEND": "dogpile.cache.redis",
        "DECLCACHE_ARGUMENTS": json.dumps({"password": [SECRET]}),
    },
    "sentinel-password-and-a-typo": {
        "DECLCACHE_URL": "redis+sentinel://h:26379/mymaster",
        "DECLCACHE_ARGUMENTS": json.dumps(
            {"sentinel_kwargs": {"password": SECRET, "socket_timeout": "x"}}
        ),
    },
    "url-argument-and-a-bad-value": {
        "DECLCACHE_BACKEND": "dogpile.cache.redis",
        "DECLCACHE_ARGUMENTS": json.dumps({"url": f"redis://:{SECRET}@h/0", "db": -1}),
    },
    "url-and-a-bad-other-setting": {
        "DECLCACHE_URL": f"redis://:{SECRET}@h/0",
        "DECLCACHE_BREAKER_INTERVAL": "inf",
    },
}


@pytest.mark.parametrize("variables", INVALID.values(), ids=INVALID)
def test_a_failing_configuration_never_shows_the_secret(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    shown = exception_text(excinfo.value)
    assert SECRET not in shown
    assert excinfo.value.setting.startswith("DECLCACHE_")  # still names the variable
    assert excinfo.value.__context__ is None  # no chained error quoting the input


@pytest.mark.parametrize(
    "arguments",
    [
        {"url": f"redis://:{SECRET}@/0"},
        {"url": f"ftp://u:{SECRET}@h"},
        {"backend": "dogpile.cache.redis", "arguments": {"password": SECRET, "db": "x"}},
        {"backend": "dogpile.cache.redis", "arguments": {"pasword": SECRET}},
        {"url": f"redis://:{SECRET}@h/0", "expiration_time": -1},
        {"arguments": [SECRET]},
    ],
    ids=["no-host", "scheme", "bad-db", "typo", "other-field", "not-a-mapping"],
)
def test_a_failing_construction_never_shows_the_secret(arguments: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as excinfo:
        CacheConfig(**arguments)

    assert SECRET not in exception_text(excinfo.value)
    assert excinfo.value.setting.startswith("CacheConfig.")


@pytest.mark.parametrize(
    "url",
    [f"redis://:{SECRET}@/0", f"x://u:{SECRET}@h", f"redis+sentinel://u:{SECRET}@h:1"],
)
def test_parse_url_errors_are_masked_and_unchained(url: str) -> None:
    with pytest.raises(ValueError, match=r"\*\*\*") as excinfo:
        parse_url(url)

    assert SECRET not in exception_text(excinfo.value)


# -- configurations that work: repr and str ---------------------------------------------------

VALID: dict[str, Callable[[], CacheConfig]] = {
    "url-password": lambda: CacheConfig(url=f"redis://app:{SECRET}@h:6379/0"),
    "password-argument": lambda: CacheConfig(
        backend="dogpile.cache.redis", arguments={"host": "h", "password": SECRET}
    ),
    "sentinel-password": lambda: CacheConfig(
        url="redis+sentinel://h:26379/mymaster",
        arguments={"sentinel_kwargs": {"password": SECRET}},
    ),
    "url-argument": lambda: CacheConfig(
        backend="dogpile.cache.redis", arguments={"url": f"rediss://app:{SECRET}@h:6380/0"}
    ),
    "client-password": lambda: CacheConfig(
        url="redis://h/0", arguments={"connection_kwargs": {"ssl_password": SECRET}}
    ),
    "query-password": lambda: CacheConfig(url=f"redis://h/0?password={SECRET}"),
}


@pytest.mark.parametrize("make", VALID.values(), ids=VALID)
def test_repr_masks_every_secret(make: Callable[[], CacheConfig]) -> None:
    config = make()

    assert SECRET in json.dumps(dict(config.arguments), default=str)  # the client gets it
    for shown in (repr(config), str(config), repr(config.with_overrides(key_prefix="x:"))):
        assert SECRET not in shown
        assert "***" in shown


def test_repr_masks_as_sqlalchemy_does() -> None:
    config = CacheConfig(url=f"redis://app:{SECRET}@cache:6379/0")

    assert "url='redis://app:***@cache:6379/0'" in repr(config)
    assert "'username': 'app'" in repr(config)  # a user name is not a secret
    assert "'password': '***'" in repr(config)


# -- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host/0", "redis://:***@host/0"),
        ("redis://user:pw@host/0", "redis://user:***@host/0"),
        ("rediss://user:p%40ss@host:6380/0", "rediss://user:***@host:6380/0"),
        ("redis://user:p@ss/w@host/0", "redis://user:***@host/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
        ("redis+sentinel://:pw@s1:26379,s2/mymaster", "redis+sentinel://:***@s1:26379,s2/mymaster"),
        ("memcached://m1:11211,m2", "memcached://m1:11211,m2"),
        ("no host in 'redis://:pw@/0'", "no host in 'redis://:***@/0'"),
        ("user:pw@host:6379", "user:***@host:6379"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    "name",
    ["password", "ssl_password", "PASSWORD", "secret", "client_secret", "token", "auth_token"],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["username", "host", "key_prefix", "ssl_keyfile", "socket_keepalive", "author"]
)
def test_names_that_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_api_key_is_secret() -> None:
    assert is_secret_name("api_key")
    assert is_secret_name("key")


def test_masked_arguments_recursively() -> None:
    arguments = {
        "password": "a",
        "sentinel_kwargs": {"password": "b", "socket_timeout": 1},
        "url": "redis://:c@h/0",
        "startup_nodes": [{"host": "h", "password": "d"}],
        "username": "app",
    }

    assert masked(arguments) == {
        "password": "***",
        "sentinel_kwargs": {"password": "***", "socket_timeout": 1},
        "url": "redis://:***@h/0",
        "startup_nodes": [{"host": "h", "password": "***"}],
        "username": "app",
    }
    assert secrets_in(arguments) == {"a", "b", "c", "d"}


def test_redact_replaces_known_secrets_and_masks_urls() -> None:
    text = "AUTH failed with hunter2 at redis://app:other@h:6379/0"

    assert redact(text, {"hunter2"}) == "AUTH failed with *** at redis://app:***@h:6379/0"


def test_a_fault_log_record_never_shows_a_configured_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client's error may quote what it was configured with: the manager's log redacts it."""
    config = CacheConfig(url="redis://app:Pl4nted-Secret@cache.internal:6380/0")
    faults = FaultLog(logging.getLogger("declcache.test"), secrets=config.secrets)
    error = ConnectionError("AUTH app Pl4nted-Secret refused by redis://app:Pl4nted-Secret@h/0")

    with caplog.at_level(logging.WARNING, "declcache.test"):
        faults.warning("kind", "cache get failed: %r / %s", error, error)

    (record,) = caplog.records
    shown = record.getMessage()
    assert "Pl4nted-Secret" not in shown
    assert "AUTH app *** refused" in shown
    assert "ConnectionError: AUTH" in shown  # the error is still named, only the secret is gone
