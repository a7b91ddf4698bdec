"""Turn a ``DECLCACHE_URL`` into a dogpile backend name and its arguments.

One URL is what operators already have for Redis or Memcached, so declcache accepts it instead
of a backend name plus a JSON object of arguments. Parsing is pure: nothing is connected here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["parse_cache_url"]

_SCHEMES = (
    "redis://, rediss://, redis+cluster://, redis+sentinel://, memcached://, file://, "
    "memory://, null://"
)


def _coerce(text: str) -> Any:
    """Give a query-string value its obvious Python type (bool, int, float or str)."""
    lowered = text.lower()
    if lowered in {"true", "yes", "on"}:
        return True
    if lowered in {"false", "no", "off"}:
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _host_port(netloc: str, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]`` or ``[ipv6][:port]``."""
    if netloc.startswith("["):
        host, bracket, rest = netloc.partition("]")
        if not bracket:
            raise ValueError(f"unclosed '[' in {netloc!r}")
        host, port = host + "]", rest.removeprefix(":")
    else:
        host, _, port = netloc.partition(":")
    if not host or host == "[]":
        raise ValueError(f"no host in {netloc!r}")
    if not port:
        return host, default_port
    if not port.isdigit():
        raise ValueError(f"port {port!r} is not a number")
    return host, int(port)


def _redis(url: str) -> tuple[str, dict[str, Any]]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    arguments: dict[str, Any] = {"host": parts.hostname, "port": parts.port or 6379}
    db_text = parts.path.strip("/")
    if db_text:
        if not db_text.isdigit():
            raise ValueError(f"database {db_text!r} is not a number (redis://host:port/DB)")
        arguments["db"] = int(db_text)
    if parts.username:
        arguments["username"] = unquote(parts.username)
    if parts.password:
        arguments["password"] = unquote(parts.password)
    if parts.scheme == "rediss":
        arguments["ssl"] = True
    arguments.update({key: _coerce(value) for key, value in parse_qsl(parts.query)})
    return "dogpile.cache.redis", arguments


def _nodes(netloc: str, default_port: int, example: str) -> list[str]:
    """``host:port`` of each comma-separated node of a URL's network location."""
    servers = [item.strip() for item in netloc.split(",") if item.strip()]
    if not servers:
        raise ValueError(f"no server in {example}")
    nodes = []
    for server in servers:
        host, port = _host_port(server, default_port)
        nodes.append(f"{host}:{port}")
    return nodes


def _credentials(netloc: str) -> tuple[str, dict[str, Any]]:
    """Split ``[user[:password]@]nodes`` into the nodes and credential arguments."""
    userinfo, at, nodes = netloc.rpartition("@")
    if not at:
        return netloc, {}
    arguments: dict[str, Any] = {}
    username, _, password = userinfo.partition(":")
    if username:
        arguments["username"] = unquote(username)
    if password:
        arguments["password"] = unquote(password)
    return nodes, arguments


def _redis_cluster(url: str) -> tuple[str, dict[str, Any]]:
    rest = url.split("://", 1)[1]
    netloc, _, query = rest.partition("?")
    netloc = netloc.split("/", 1)[0]
    netloc, arguments = _credentials(netloc)
    example = "redis+cluster://host:port[,host:port]"
    arguments["startup_nodes"] = _nodes(netloc, 6379, example)
    arguments.update({key: _coerce(value) for key, value in parse_qsl(query)})
    return "dogpile.cache.redis_cluster", arguments


def _redis_sentinel(url: str) -> tuple[str, dict[str, Any]]:
    rest = url.split("://", 1)[1]
    location, _, query = rest.partition("?")
    netloc, _, path = location.partition("/")
    netloc, arguments = _credentials(netloc)
    example = "redis+sentinel://host:port[,host:port]/service[/db]"
    arguments["sentinels"] = _nodes(netloc, 26379, example)
    service, _, db_text = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"no service name in {url!r}; expected {example}")
    arguments["service_name"] = unquote(service)
    if db_text:
        if not db_text.isdigit():
            raise ValueError(f"database {db_text!r} is not a number ({example})")
        arguments["db"] = int(db_text)
    arguments.update({key: _coerce(value) for key, value in parse_qsl(query)})
    return "dogpile.cache.redis_sentinel", arguments


def _memcached(url: str) -> tuple[str, dict[str, Any]]:
    netloc = url[len("memcached://") :].split("/", 1)[0].split("?", 1)[0]
    nodes = _nodes(netloc, 11211, "memcached://host:port[,host:port]")
    query = urlsplit(url).query
    arguments: dict[str, Any] = {"url": nodes}
    arguments.update({key: _coerce(value) for key, value in parse_qsl(query)})
    return "dogpile.cache.pymemcache", arguments


def _file(url: str) -> tuple[str, dict[str, Any]]:
    parts = urlsplit(url)
    if parts.netloc not in {"", "localhost"}:
        raise ValueError(
            f"{url!r} names host {parts.netloc!r}; a file URL is file:///absolute/path.dbm"
        )
    path = unquote(parts.path)
    if not path or path.endswith("/"):
        raise ValueError("no file name in file:///path/cache.dbm")
    return "dogpile.cache.dbm", {"filename": path}


def parse_cache_url(url: str) -> tuple[str, dict[str, Any]]:
    """Return ``(backend, arguments)`` for a cache URL.

    Args:
        url: ``redis://[user:password@]host[:port][/db][?option=value]``, ``rediss://…``,
            ``redis+cluster://[user:password@]host:port[,host:port]`` (Redis Cluster, any
            of its nodes), ``redis+sentinel://[user:password@]host:port[,host:port]/service[/db]``
            (the Sentinels, and the name of the master they watch),
            ``memcached://host:port[,host:port]``, ``file:///path/cache.dbm``, ``memory://``
            or ``null://``. Query options become backend arguments
            (``redis://h/0?distributed_lock=true``).

    Raises:
        ValueError: the URL has an unknown scheme or is malformed; the message says how.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in {"redis", "rediss"}:
        return _redis(url)
    if scheme == "redis+cluster":
        return _redis_cluster(url)
    if scheme == "redis+sentinel":
        return _redis_sentinel(url)
    if scheme == "memcached":
        return _memcached(url)
    if scheme == "file":
        return _file(url)
    if scheme == "memory":
        return "dogpile.cache.memory", {}
    if scheme == "null":
        return "dogpile.cache.null", {}
    raise ValueError(f"unknown scheme in {url!r}; expected one of {_SCHEMES}")
