"""Payload formats: every accepted spelling of a serializer, and a clear error for the others."""

import datetime as dt
import json
import re
import sys
from typing import Any

import pytest

from declcache import CacheConfig
from declcache.serializers import (
    FunctionFormat,
    JsonFormat,
    ModelFunctionFormat,
    MsgpackFormat,
    SerializationFormat,
    resolve_format,
)

PLAIN_DATA = [
    None,
    True,
    False,
    0,
    -(2**53),
    2**62,
    1.5,
    "",
    "zo\u00eb \u65e5\u672c \U0001f600 \x00",
    [1, [2, [3]]],
    {"k": "v", "n": None, "list": [1.25, "x"]},
]


def roundtrip(format_: SerializationFormat, data: Any) -> Any:
    payload = format_.dumps(data)
    return format_.loads(payload.encode() if isinstance(payload, str) else payload)


@pytest.fixture
def formats_module(write_module: Any) -> str:
    """A module holding a format object, a format class, a pair and a few non-formats."""
    return write_module(
        "declcache_test_serializers",
        """
        import json

        class Upper:
            '''A format class: resolve_format instantiates it.'''

            def dumps(self, obj):
                return json.dumps(obj).encode()

            def loads(self, data):
                return json.loads(data)

        INSTANCE = Upper()
        PAIR = (json.dumps, json.loads)
        HALF = (json.dumps,)
        NUMBER = 42

        class NoLoads:
            def dumps(self, obj):
                return b""
        """,
    )


# -- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "kind"), [("json", JsonFormat), ("msgpack", MsgpackFormat)])
def test_builtin_names(spec: str, kind: type) -> None:
    name, format_ = resolve_format(spec)

    assert name == spec
    assert isinstance(format_, kind)
    assert isinstance(format_, SerializationFormat)
    for data in PLAIN_DATA:
        assert roundtrip(format_, data) == data


def test_json_is_compact_utf8() -> None:
    _, format_ = resolve_format("json")

    assert format_.dumps({"a": [1, "\u00e9"]}) == '{"a":[1,"\u00e9"]}'.encode()


@pytest.mark.parametrize("attribute", ["INSTANCE", "Upper", "PAIR"])
def test_module_attribute_spellings(formats_module: str, attribute: str) -> None:
    spec = f"{formats_module}:{attribute}"

    name, format_ = resolve_format(spec)

    assert name == spec
    assert roundtrip(format_, {"x": [1, 2]}) == {"x": [1, 2]}


def test_dotted_module_path() -> None:
    name, format_ = resolve_format("declcache.serializers:JsonFormat")

    assert name == "declcache.serializers:JsonFormat"
    assert isinstance(format_, JsonFormat)


def test_pair_of_functions() -> None:
    name, format_ = resolve_format((json.dumps, json.loads))

    assert name == "pair:json:dumps"
    assert isinstance(format_, FunctionFormat)
    assert roundtrip(format_, {"a": 1}) == {"a": 1}


def test_format_object_and_format_class() -> None:
    instance = JsonFormat()

    assert resolve_format(instance)[1] is instance
    name, format_ = resolve_format(JsonFormat)
    assert name == "declcache.serializers:JsonFormat"
    assert isinstance(format_, JsonFormat)


def test_json_module_itself_is_a_format() -> None:
    _, format_ = resolve_format(json)

    assert roundtrip(format_, {"a": [1]}) == {"a": [1]}


def test_modules_used_as_formats_get_distinct_names() -> None:
    msgpack = pytest.importorskip("msgpack")

    json_name, _ = resolve_format(json)
    msgpack_name, _ = resolve_format(msgpack)

    assert json_name != msgpack_name
    assert "json" in json_name


# -- rejected ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            "yaml",
            "unknown serializer 'yaml'; expected 'json', 'msgpack' or 'package.module:name'",
            id="unknown-name",
        ),
        pytest.param("JSON", "unknown serializer 'JSON'", id="wrong-case"),
        pytest.param("", "unknown serializer ''", id="empty"),
        pytest.param(":dumps", "unknown serializer ':dumps'", id="no-module"),
        pytest.param("json:", "unknown serializer 'json:'", id="no-attribute"),
        pytest.param(
            "no.such.module:fmt",
            "cannot import module 'no.such.module' of 'no.such.module:fmt'",
            id="unimportable",
        ),
        pytest.param("json:nope", "module 'json' has no attribute 'nope'", id="missing-attribute"),
        pytest.param(
            "json:dumps",
            "json:dumps is neither a (dumps, loads) pair nor an object with dumps() and loads()",
            id="a-function",
        ),
        pytest.param((json.dumps,), "neither a (dumps, loads) pair", id="half-pair"),
        pytest.param((json.dumps, json.loads, json.loads), "neither", id="triple"),
        pytest.param((1, 2), "neither", id="pair-of-non-callables"),
        pytest.param((), "neither", id="empty-tuple"),
        pytest.param(42, "neither", id="int"),
        pytest.param(dt.date, "neither", id="class-without-dumps"),
    ],
)
def test_bad_serializer_raises_a_clear_value_error(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_format(spec)


@pytest.mark.parametrize("attribute", ["HALF", "NUMBER", "NoLoads"])
def test_module_attribute_that_is_not_a_format(formats_module: str, attribute: str) -> None:
    spec = f"{formats_module}:{attribute}"

    with pytest.raises(ValueError, match="is neither a") as excinfo:
        resolve_format(spec)

    assert spec in str(excinfo.value)


def test_msgpack_without_the_package_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "msgpack", None)

    with pytest.raises(ValueError, match=r"pip install 'declcache\[msgpack\]'"):
        resolve_format("msgpack")


# -- advanced-alchemy's model pair ---------------------------------------------------------------


def _model_dumps(instance: Any) -> bytes:
    return json.dumps({"id": instance.id}).encode()


def _model_loads(data: bytes, model_class: type) -> Any:
    return model_class(**json.loads(data))


def _loads_with_an_option(data: bytes, model_class: type | None = None) -> Any:
    return json.loads(data)


@pytest.mark.parametrize(
    ("pair", "kind"),
    [
        pytest.param((_model_dumps, _model_loads), ModelFunctionFormat, id="two-positional"),
        pytest.param((json.dumps, json.loads), FunctionFormat, id="json-module-functions"),
        pytest.param((_model_dumps, _loads_with_an_option), FunctionFormat, id="optional-second"),
        pytest.param((str, bytes.decode), FunctionFormat, id="builtin-method"),
    ],
)
def test_a_pair_is_a_model_pair_when_its_deserializer_takes_data_and_model_class(
    pair: tuple[Any, Any], kind: type
) -> None:
    name, format_ = resolve_format(pair)

    assert type(format_) is kind
    assert name.startswith("model-pair:" if kind is ModelFunctionFormat else "pair:")


def test_an_unbound_model_pair_refuses_to_encode() -> None:
    _name, format_ = resolve_format((_model_dumps, _model_loads))

    with pytest.raises(TypeError, match="bind it to one first"):
        format_.dumps(["fingerprint", "generation", "e", 1])


def test_a_model_pair_is_accepted_as_the_config_default() -> None:
    config = CacheConfig(serializer=_model_dumps, deserializer=_model_loads)

    assert config.serializer_spec == (_model_dumps, _model_loads)
