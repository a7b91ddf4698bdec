"""Secrets never leave the process: which names hold one, and how values are shown masked.

A cache configuration carries credentials — a password in ``DECLCACHE_URL``, a ``password`` or
``sentinel_kwargs.password`` argument, a token in a ``url`` argument — and declcache shows
configurations in many places: error messages, ``repr(CacheConfig(...))``, log records and
every ``declcache`` command. Each of those goes through this module, so there is one rule for
what a secret is and one way to hide it:

- a URL is shown as SQLAlchemy's ``URL.render_as_string(hide_password=True)`` shows it:
  ``redis://user:***@host/0``; a query option with a secret name is masked too;
- a mapping of arguments is shown with the value of every secret name (:func:`is_secret_name`)
  replaced by ``***``, recursively, and every URL in it masked;
- free text that may quote a secret (a client's error message) is :func:`redact`-ed: every
  known secret value replaced, and every URL in it masked.

Pure text handling: no I/O, and nothing else from the package is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

__all__ = ["MASK", "is_secret_name", "mask_url", "masked", "redact", "secrets_in"]

#: What a secret is shown as.
MASK = "***"

#: Words that make a name secret wherever they appear in it (``ssl_password``, ``authtoken``).
_SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "token", "credential")
#: Words that make a name secret as its last word only: ``api_key`` and ``auth`` are secrets,
#: ``key_prefix``, ``ssl_keyfile`` and ``author`` are not.
_SECRET_LAST_WORDS = frozenset({"key", "pwd", "auth", "apikey"})

#: ``scheme://`` (optional), then ``user:password@``: the password runs to the last ``@``
#: before any whitespace or quote, so an unencoded ``@`` or ``/`` in it is masked too.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)?"
    r"(?P<user>[^\s:/@'\"?#]*):(?!//)(?P<password>[^\s'\"]*)@(?=[^\s'\"@]*(?:[\s'\"]|$))"
)
#: ``?name=value`` or ``&name=value`` of a URL's query string.
_QUERY_OPTION = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*)")


def is_secret_name(name: str) -> bool:
    """Whether an argument or option called ``name`` holds a secret (its value is never shown)."""
    lowered = name.lower()
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    words = [word for word in re.split(r"[^a-z0-9]+", lowered) if word]
    return bool(words) and words[-1] in _SECRET_LAST_WORDS


def _masked_option(found: re.Match[str]) -> str:
    if not is_secret_name(found["name"]):
        return found[0]
    return f"{found['lead']}{found['name']}={MASK}"


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it, and secret query options, masked.

    ``redis://:pw@host/0`` → ``redis://:***@host/0``; ``redis://app:pw@host`` →
    ``redis://app:***@host``; ``…?password=pw`` → ``…?password=***``. A username is kept:
    it is not a secret, and it tells which account was used. Text without a URL is returned
    unchanged.
    """
    text = _USERINFO.sub(lambda found: f"{found['scheme'] or ''}{found['user']}:{MASK}@", text)
    return _QUERY_OPTION.sub(_masked_option, text) if "=" in text else text


def masked(value: Any, name: str = "") -> Any:
    """``value`` as it may be shown: secret names' values masked, recursively, URLs masked.

    Args:
        value: an argument value, a mapping of arguments, or a list of them.
        name: the name ``value`` is given under (``""`` at the top).
    """
    if name and is_secret_name(name) and value is not None:
        return MASK
    if isinstance(value, Mapping):
        return {key: masked(item, str(key)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(masked(item) for item in value)
    if isinstance(value, str):
        return mask_url(value)
    return value


def _url_passwords(text: str) -> set[str]:
    found: set[str] = set()
    for match in _USERINFO.finditer(text):
        password = match["password"]
        found |= {password, unquote(password)}
    for match in _QUERY_OPTION.finditer(text):
        if is_secret_name(match["name"]):
            found |= {match["value"], unquote(match["value"])}
    return found


def secrets_in(value: Any, name: str = "") -> set[str]:
    """Every secret text ``value`` holds: secret names' values and URL passwords, recursively.

    What :func:`redact` hides in a message that may quote them (a client's error).
    """
    found: set[str] = set()
    if name and is_secret_name(name) and isinstance(value, str | bytes):
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        found.add(text)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            found |= secrets_in(item, str(key))
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            found |= secrets_in(item)
    elif isinstance(value, str):
        found |= _url_passwords(value)
    return {secret for secret in found if secret}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***`` and every URL in it masked.

    The longest secrets are replaced first, so one that contains another goes whole.
    """
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return mask_url(text)


#: The arguments that say where a backend is (and as whom), in the order they are shown.
_TARGET_ARGUMENTS = (
    "url",
    "startup_nodes",
    "host",
    "port",
    "db",
    "filename",
    "sentinels",
    "service_name",
    "username",
)


def describe_target(arguments: Mapping[str, Any]) -> str:
    """Where a backend is and as whom (``host=10.0.0.5, port=6379``), passwords masked."""
    shown = masked(arguments)
    found = [f"{name}={shown[name]}" for name in _TARGET_ARGUMENTS if name in shown]
    return ", ".join(found) or "in this process"


def describe_error(error: BaseException, secrets: Iterable[str] = ()) -> str:
    """``Class: message`` of ``error``, without any of ``secrets``.

    Not ``repr``: redis-py's is only a category (``network:TimeoutError``), which loses the
    errno and the address the message carries.
    """
    message = redact(str(error), secrets)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
