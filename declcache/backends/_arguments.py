"""What a backend family accepts as arguments: each name's kind, bounds and conversion from text.

dogpile's backends read the arguments they know and silently ignore the others, and take
whatever type they are given: ``?distributed_lok=true`` was a no-op and ``?socket_timeout=abc``
made every call fail with ``TypeError``. Each family (:class:`~declcache.backends.Backend`
subclass) therefore declares the arguments its dogpile backend reads — taken from dogpile's
``__init__`` — as a mapping of name to :class:`Kind`, and :func:`checked` refuses an unknown
name (with a did-you-mean) and a value of the wrong type or out of bounds, when the
configuration is built.

A URL's query options are text: each kind converts its text (``"0.2"`` → ``0.2``,
``"true"`` → ``True``). Arguments given as JSON or in Python are checked as they are (an
integer is a fine number of seconds; ``"0.2"`` is not).

Messages name the argument and never quote the value of a secret one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

from declcache._secrets import is_secret_name

__all__ = [
    "ANY",
    "EXPIRY",
    "FLAG",
    "MAX_EXPIRY",
    "MAX_WAIT",
    "NODES",
    "TEXT",
    "Kind",
    "Options",
    "Seconds",
    "Whole",
    "checked",
    "client_kwargs",
]

#: Seconds any wait may last (a socket timeout, a lock's life, the breaker's pause): a cache
#: that takes longer than an hour to answer is down, and a longer wait only hides that.
MAX_WAIT = 3600.0
#: Seconds any expiry may be (a ttl, a server expiry): ten years. A longer one is a unit
#: mistake (milliseconds), and every backend stores up to this (Memcached as an absolute time).
MAX_EXPIRY = 10 * 365 * 86_400

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class Kind:
    """The values one argument accepts.

    Subclasses override :meth:`check` (a value given as it is) and, if a URL may set the
    argument, :meth:`from_text`.
    """

    #: Whether a URL's query string may set it (an object such as a pool cannot be text).
    in_urls = True

    @property
    def expected(self) -> str:
        """How a message describes the kind: "true or false", "text" and so on."""
        return "a value"

    def check(self, value: Any) -> Any:
        """``value`` if acceptable (possibly normalised), else ``ValueError`` saying why."""
        return value

    def from_text(self, text: str) -> Any:
        """The value a query option's ``text`` means, checked."""
        return self.check(text)


class _Flag(Kind):
    @property
    def expected(self) -> str:
        """True or false."""
        return "true or false"

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"expected {self.expected}")
        return value

    def from_text(self, text: str) -> Any:
        lowered = text.lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(f"expected {self.expected} (true/false, yes/no, on/off, 1/0)")


class _Text(Kind):
    @property
    def expected(self) -> str:
        """Text."""
        return "text"

    def check(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"expected {self.expected}, got {type(value).__name__}")
        return value


class _Nodes(Kind):
    """``"host:port"`` or a list of them (a Memcached ``url``)."""

    @property
    def expected(self) -> str:
        """'host:port' or a list of them."""
        return "'host:port' or a list of them"

    in_urls = False

    def check(self, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"expected {self.expected}")
        return value


class _Object(Kind):
    """An object dogpile or the client takes as it is (a pool, a serde, a TLS context)."""

    @property
    def expected(self) -> str:
        """An object (not settable in a URL)."""
        return "an object (not settable in a URL)"

    in_urls = False


@dataclasses.dataclass(frozen=True)
class _Number(Kind):
    """A finite number between ``minimum`` and ``maximum``; whole if ``whole``."""

    minimum: float
    maximum: float
    whole: bool = False
    #: Whether ``minimum`` itself is refused (a timeout of 0 s is not a timeout).
    above_minimum: bool = False
    unit: str = ""

    @property
    def expected(self) -> str:
        """Its bounds, as a message gives them."""
        what = "a whole number" if self.whole else "a number"
        low = "above" if self.above_minimum else "at least"
        unit = f" {self.unit}" if self.unit else ""
        return f"{what}{unit} {low} {self.minimum:g} and at most {self.maximum:g}"

    def check(self, value: Any) -> Any:
        kinds = (int,) if self.whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"expected {self.expected}, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"expected {self.expected}, got a non-finite number")
        too_low = value <= self.minimum if self.above_minimum else value < self.minimum
        if too_low or value > self.maximum:
            raise ValueError(f"expected {self.expected}, got {value!r}")
        return value

    def from_text(self, text: str) -> Any:
        try:
            value: float = int(text) if self.whole else float(text)
        except ValueError:
            raise ValueError(f"expected {self.expected}, got {text!r}") from None
        return self.check(value)


class Seconds(_Number):
    """A wait in seconds: finite, positive (or ≥ 0 where 0 means off), at most :data:`MAX_WAIT`."""

    def __init__(self, *, zero_allowed: bool = False, whole: bool = False) -> None:
        super().__init__(
            0, MAX_WAIT, whole=whole, above_minimum=not zero_allowed, unit="of seconds"
        )


class Whole(_Number):
    """A whole number between ``minimum`` and ``maximum``."""

    def __init__(self, minimum: int, maximum: int) -> None:
        super().__init__(minimum, maximum, whole=True)


class _Mapping(Kind):
    """A mapping of client keyword arguments, passed through; the ones in ``known`` are checked."""

    @property
    def expected(self) -> str:
        """An object (a JSON object) of client arguments."""
        return "an object (a JSON object) of client arguments"

    in_urls = False

    def __init__(self, known: Mapping[str, Kind]) -> None:
        self.known = known

    def check(self, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"expected {self.expected}")
        result = dict(value)
        return {
            **result,
            **checked({name: result[name] for name in self.known if name in result}, self.known),
        }


FLAG: Kind = _Flag()
TEXT: Kind = _Text()
NODES: Kind = _Nodes()
ANY: Kind = _Object()
#: An expiry set on the server, in whole seconds; 0 means none.
EXPIRY: Kind = _Number(0, MAX_EXPIRY, whole=True, unit="of seconds")


def client_kwargs(known: Mapping[str, Kind]) -> Kind:
    """A ``connection_kwargs``-like mapping passed to the client; the ``known`` names checked."""
    return _Mapping(known)


Options = Mapping[str, Kind]


def _unknown(name: str, accepted: Options, where: str, *, text: bool) -> str:
    if text:  # a URL can only set what has a text form
        accepted = {known: kind for known, kind in accepted.items() if kind.in_urls}
    close = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown {where} {name!r}{hint}; the backend reads {', '.join(sorted(accepted)) or 'none'}"
    )


@dataclasses.dataclass(frozen=True)
class _Refused:
    text: str


def _problem(kind: Kind, value: Any, *, text: bool) -> Any:
    """The checked value, or why it is refused (returned, so no exception carries the value)."""
    try:
        return kind.from_text(value) if text else kind.check(value)
    except ValueError as error:
        return _Refused(str(error))


def checked(
    arguments: Mapping[str, Any],
    accepted: Options,
    *,
    text: bool = False,
    passed_on: tuple[str, Options] | None = None,
) -> dict[str, Any]:
    """``arguments`` checked against ``accepted``: every name known, every value of its kind.

    Args:
        arguments: the arguments (or a URL's query options, as text).
        accepted: what the backend reads.
        text: the values are a URL's query text, converted by each kind.
        passed_on: ``(mapping name, its known names)``: a name the backend does not read but
            its client does is moved into that mapping (``?ssl_ca_certs=…`` into
            ``connection_kwargs``), where the backend passes it to the client.

    Raises:
        ValueError: an unknown name (with a did-you-mean) or a bad value; the message names
            it and never quotes a secret's value.
    """
    where = "query option" if text else "argument"
    result: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for name, value in arguments.items():
        kind = accepted.get(name)
        target = result
        if kind is None and passed_on is not None and name in passed_on[1]:
            kind, target = passed_on[1][name], moved
        if kind is None:
            everything = {**accepted, **(passed_on[1] if passed_on else {})}
            raise ValueError(_unknown(name, everything, where, text=text))
        if text and not kind.in_urls:
            raise ValueError(f"{where} {name!r} cannot be set in a URL: pass it as an argument")
        problem = _problem(kind, value, text=text)
        if isinstance(problem, _Refused):
            # a kind quotes what it got: not a secret's value
            shown = f"expected {kind.expected}" if is_secret_name(name) else problem.text
            raise ValueError(f"{where} {name!r}: {shown}")
        target[name] = problem
    if moved and passed_on is not None:
        result[passed_on[0]] = {**moved, **result.get(passed_on[0], {})}
    return result
