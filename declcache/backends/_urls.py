"""Pieces of cache URLs that several families read alike: hosts, node lists, credentials.

Pure text handling: nothing is connected here. Each family's ``parse_url`` puts them together
for its own scheme; its query options are read by ``Backend.query_options``.
No message here quotes the credentials: :func:`credentials` is split off before anything
else is read.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

__all__ = ["credentials", "host_port", "nodes", "whole_number"]


def whole_number(text: str, what: str, example: str) -> int:
    """``text`` as a non-negative integer, or a ``ValueError`` saying what was expected."""
    if not text.isdigit():
        raise ValueError(f"{what} {text!r} is not a number ({example})")
    return int(text)


def host_port(netloc: str, default_port: int) -> tuple[str, int]:
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


def nodes(netloc: str, default_port: int, example: str) -> list[str]:
    """``host:port`` of each comma-separated node of a URL's network location."""
    servers = [item.strip() for item in netloc.split(",") if item.strip()]
    if not servers:
        raise ValueError(f"no server in {example}")
    found = []
    for server in servers:
        host, port = host_port(server, default_port)
        found.append(f"{host}:{port}")
    return found


def credentials(netloc: str) -> tuple[str, dict[str, Any]]:
    """Split ``[user[:password]@]nodes`` into the nodes and credential arguments."""
    userinfo, at, rest = netloc.rpartition("@")
    if not at:
        return netloc, {}
    arguments: dict[str, Any] = {}
    username, _, password = userinfo.partition(":")
    if username:
        arguments["username"] = unquote(username)
    if password:
        arguments["password"] = unquote(password)
    return rest, arguments
