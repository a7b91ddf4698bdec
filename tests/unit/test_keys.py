"""Cache keys (issue 3 point 6): valid on every backend whatever the values; fingerprints.

A key is ``prefix + model + key fields = values``. Memcached refuses spaces,
control characters and keys over 250 bytes, so every key must be printable ASCII without
spaces and at most 250 bytes, and distinct values must still give distinct keys.
"""

import datetime as dt
import os
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    Integer,
    Numeric,
    String,
    Text,
    Uuid,
    inspect,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, mapped_column

import declcache
from declcache import CacheManager, _codec
from declcache._codec import CODEC_VERSION, fingerprint
from declcache._keys import MAX_KEY_BYTES, KeyBuilder, _normalizer, collation_problem
from declcache._meta import read_cache_meta
from declcache._payload import LINEAGE_CHARS
from declcache.exceptions import CacheMetaError


def is_backend_safe(key: str) -> bool:
    """Printable ASCII without spaces (``!`` to ``~``) and at most 250 bytes."""
    return len(key.encode()) <= MAX_KEY_BYTES and all("!" <= char <= "~" for char in key)


def make_model(
    base: type[DeclarativeBase],
    cache_meta: dict[str, Any] | None = None,
    *,
    table: str = "items",
    **columns: Any,
) -> type:
    """``Item`` on ``base``; its columns default to ``id`` (int) and ``name`` (String(50))."""
    columns = columns or {
        "id": mapped_column(Integer, primary_key=True),
        "name": mapped_column(String(50)),
    }
    namespace = {"__tablename__": table, **columns}
    namespace["CacheMeta"] = type("CacheMeta", (), cache_meta or {"ttl": 60})
    return type("Item", (base,), namespace)


def keys_of(model: type, prefix: str = "dc:") -> KeyBuilder:
    return KeyBuilder(prefix, inspect(model))


@pytest.fixture
def users(base: type[DeclarativeBase]) -> KeyBuilder:
    """Keys of ``User(id int, email unique str, handle unique text)``."""
    model = type(
        "User",
        (base,),
        {
            "__tablename__": "users",
            "id": mapped_column(Integer, primary_key=True),
            "email": mapped_column(String(300), unique=True),
            "handle": mapped_column(Text, unique=True),
            "CacheMeta": type("CacheMeta", (), {"key_fields": (("email",), ("handle",))}),
        },
    )
    return keys_of(model)


# -- shape -----------------------------------------------------------------------------------


def test_key_is_prefix_model_fingerprint_and_value(users: KeyBuilder) -> None:
    key = users.entity_key(("id",), (7,))

    assert key.startswith("dc:User:")
    assert key.startswith(users.head)
    assert key.endswith("id=7")
    assert is_backend_safe(key)


def test_prefix_separates_applications(base: type[DeclarativeBase]) -> None:
    model = make_model(base)

    one = keys_of(model, prefix="app1:").entity_key(("id",), (1,))
    two = keys_of(model, prefix="app2:").entity_key(("id",), (1,))

    assert one.startswith("app1:")
    assert two.startswith("app2:")
    assert one != two


def test_different_key_sets_never_share_a_key(users: KeyBuilder) -> None:
    by_id = users.entity_key(("id",), (1,))
    by_email = users.entity_key(("email",), ("1",))
    by_handle = users.entity_key(("handle",), ("1",))

    assert len({by_id, by_email, by_handle}) == 3


def test_bookkeeping_keys_are_safe_and_distinct_from_entity_keys(users: KeyBuilder) -> None:
    names = ["generation", "list-version", "q:" + "0123456789abcdef" * 4, "q:" + "f" * 400]

    keys = [users.named_key(name) for name in names]

    assert all(is_backend_safe(key) and key.startswith(users.head) for key in keys)
    assert len(set(keys)) == len(names)
    assert users.entity_key(("id",), (1,)) not in keys


@pytest.mark.parametrize(
    "name",
    ["q:select * from users where name = 'a b'", "q:" + "\u00e9" * 200, "q:tab\there"],
    ids=["spaces", "non-ascii", "control"],
)
def test_bookkeeping_key_of_any_name_is_backend_safe(users: KeyBuilder, name: str) -> None:
    assert is_backend_safe(users.named_key(name))


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("ann@example.com", id="plain"),
        pytest.param("ann smith @ example", id="spaces"),
        pytest.param("Zo\u00eb \u65e5\u672c\u8a9e \U0001f600", id="unicode"),
        pytest.param("a\x00b\nc\td\re\x7ff\x1b", id="control-characters"),
        pytest.param("a:b,c+d=e%20f#g/h", id="separators"),
        pytest.param("", id="empty"),
    ],
)
def test_string_values_give_backend_safe_keys(users: KeyBuilder, value: str) -> None:
    key = users.entity_key(("email",), (value,))

    assert is_backend_safe(key)


def test_similar_strings_give_different_keys(users: KeyBuilder) -> None:
    values = ["a b", "a_b", "a+b", "a%20b", "a%2520b", "A B", "a  b", "a\tb", "a\u00a0b"]

    keys = {users.entity_key(("email",), (value,)) for value in values}

    assert len(keys) == len(values)


@pytest.mark.parametrize("length", [200, 251, 1_000, 100_000])
def test_long_values_are_hashed_within_250_bytes(users: KeyBuilder, length: int) -> None:
    value = "\u00e9" * length

    key = users.entity_key(("email",), (value,))

    assert is_backend_safe(key)
    assert key.startswith(users.head)


def test_long_values_differing_only_at_the_end_give_different_keys(users: KeyBuilder) -> None:
    stem = "x" * 1_000

    first = users.entity_key(("email",), (stem + "a",))
    second = users.entity_key(("email",), (stem + "b",))

    assert first != second
    assert is_backend_safe(first)
    assert is_backend_safe(second)


def test_long_prefix_and_long_value_still_fit(base: type[DeclarativeBase]) -> None:
    model = make_model(base)
    keys = keys_of(model, prefix="p" * 63 + ":")

    key = keys.entity_key(("name",), ("y" * 5_000,))

    assert is_backend_safe(key)
    assert key.startswith("p" * 63 + ":Item:")


def test_a_short_key_stays_readable(users: KeyBuilder) -> None:
    key = users.entity_key(("email",), ("ann@example.com",))

    assert key.endswith("email=ann%40example.com")


def test_int_and_its_text_give_the_same_key_for_an_integer_column(users: KeyBuilder) -> None:
    assert users.entity_key(("id",), (7,)) == users.entity_key(("id",), ("7",))
    assert users.entity_key(("id",), (7,)) == users.entity_key(("id",), (7.0,))
    assert users.entity_key(("id",), (7,)) != users.entity_key(("id",), (8,))


@pytest.mark.parametrize("value", ["abc", "7.5", 7.5])
def test_value_that_is_not_an_integer_is_rejected_for_an_integer_column(
    users: KeyBuilder, value: object
) -> None:
    with pytest.raises(ValueError, match=r"7\.5|abc"):
        users.entity_key(("id",), (value,))


def test_uuid_object_and_its_spellings_give_the_same_key(base: type[DeclarativeBase]) -> None:
    model = make_model(base, id=mapped_column(Uuid, primary_key=True))
    keys = keys_of(model)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")

    spellings = [ident, str(ident), str(ident).upper(), ident.hex, f"{{{ident}}}"]
    found = {keys.entity_key(("id",), (spelling,)) for spelling in spellings}

    assert len(found) == 1
    assert is_backend_safe(found.pop())
    assert keys.entity_key(("id",), (ident,)) != keys.entity_key(("id",), (uuid.uuid4(),))


def test_composite_keys(base: type[DeclarativeBase]) -> None:
    model = make_model(
        base,
        org=mapped_column(BigInteger, primary_key=True),
        slug=mapped_column(String(500), primary_key=True),
    )
    keys = keys_of(model)

    key = keys.entity_key(("org", "slug"), (3, "hello world"))

    assert is_backend_safe(key)
    assert key == keys.entity_key(("org", "slug"), ("3", "hello world"))
    assert key != keys.entity_key(("org", "slug"), (3, "hello  world"))
    assert keys.entity_key(("org", "slug"), (1, "2,3")) != keys.entity_key(
        ("org", "slug"), (12, "3")
    )
    assert is_backend_safe(keys.entity_key(("org", "slug"), (3, "s" * 2_000)))


def test_composite_string_values_never_collide(base: type[DeclarativeBase]) -> None:
    model = make_model(
        base,
        a=mapped_column(String(50), primary_key=True),
        b=mapped_column(String(50), primary_key=True),
    )
    keys = keys_of(model)

    pairs = [("a,b", "c"), ("a", "b,c"), ("a", "b"), ("a=b", "c"), ("a+b", "c")]
    found = {keys.entity_key(("a", "b"), pair) for pair in pairs}

    assert len(found) == len(pairs)


def test_every_key_is_backend_safe_and_distinct_for_any_text(users: KeyBuilder) -> None:
    @given(st.text(), st.text())
    def check(first: str, second: str) -> None:
        one = users.entity_key(("email",), (first,))
        two = users.entity_key(("handle",), (first,))
        assert is_backend_safe(one)
        assert is_backend_safe(two)
        assert one != two
        if first != second:
            assert one != users.entity_key(("email",), (second,))

    check()


def test_every_key_is_backend_safe_and_distinct_for_any_integer(users: KeyBuilder) -> None:
    @given(st.integers(), st.integers())
    def check(first: int, second: int) -> None:
        key = users.entity_key(("id",), (first,))
        assert is_backend_safe(key)
        assert key == users.entity_key(("id",), (str(first),))
        if first != second:
            assert key != users.entity_key(("id",), (second,))

    check()


def test_every_composite_key_is_backend_safe(base: type[DeclarativeBase]) -> None:
    model = make_model(
        base,
        org=mapped_column(Integer, primary_key=True),
        slug=mapped_column(Text, primary_key=True),
    )
    keys = keys_of(model, prefix="tenant-42:")

    @given(st.integers(), st.text(), st.integers(), st.text())
    def check(org: int, slug: str, other_org: int, other_slug: str) -> None:
        key = keys.entity_key(("org", "slug"), (org, slug))
        assert is_backend_safe(key)
        if (org, slug) != (other_org, other_slug):
            assert key != keys.entity_key(("org", "slug"), (other_org, other_slug))

    check()


# -- fingerprint -----------------------------------------------------------------------------

BASE_COLUMNS = {
    "id": lambda: mapped_column(Integer, primary_key=True),
    "name": lambda: mapped_column(String(50)),
}


def fingerprint_of(
    make_base: Any,
    columns: dict[str, Any] = BASE_COLUMNS,
    *,
    table: str = "items",
    cache_meta: dict[str, Any] | None = None,
) -> str:
    """Fingerprint of ``Item`` built on a fresh base from column factories."""
    model = make_model(
        make_base(), cache_meta, table=table, **{name: make() for name, make in columns.items()}
    )
    spec = CacheManager().spec(model)
    assert spec is not None
    assert spec.fingerprint not in keys_of(model).head  # payloads'
    return spec.fingerprint


def test_fingerprint_is_deterministic(make_base: Any) -> None:
    assert fingerprint_of(make_base) == fingerprint_of(make_base)


@pytest.mark.parametrize(
    "columns",
    [
        pytest.param(
            {**BASE_COLUMNS, "note": lambda: mapped_column(String(50), nullable=True)},
            id="column-added",
        ),
        pytest.param({"id": BASE_COLUMNS["id"]}, id="column-removed"),
        pytest.param(
            {"id": BASE_COLUMNS["id"], "title": lambda: mapped_column(String(50))},
            id="column-renamed",
        ),
        pytest.param({**BASE_COLUMNS, "name": lambda: mapped_column(Text)}, id="type-text"),
        pytest.param({**BASE_COLUMNS, "name": lambda: mapped_column(Integer)}, id="type-integer"),
        pytest.param(
            {**BASE_COLUMNS, "name": lambda: mapped_column(String(100))}, id="type-length"
        ),
        pytest.param(
            {**BASE_COLUMNS, "id": lambda: mapped_column(BigInteger, primary_key=True)},
            id="type-bigint",
        ),
        pytest.param({**BASE_COLUMNS, "name": lambda: mapped_column(JSON)}, id="type-json"),
        pytest.param(
            {**BASE_COLUMNS, "name": lambda: mapped_column(Enum("a", "b", name="kind"))},
            id="type-enum",
        ),
    ],
)
def test_fingerprint_changes_with_the_columns(make_base: Any, columns: dict[str, Any]) -> None:
    assert fingerprint_of(make_base, columns) != fingerprint_of(make_base)


#: Pairs of column types that store the same Python type but not the same values: a cached row
#: of one must never be decoded as the other.
TYPE_CHANGES = [
    pytest.param(Numeric(12, 2), Numeric(12, 4), id="numeric-scale"),
    pytest.param(Numeric(12, 2), Numeric(14, 2), id="numeric-precision"),
    pytest.param(Numeric(12, 2), Numeric(12, 2, asdecimal=False), id="numeric-as-float"),
    pytest.param(Numeric(12, 2), Float(), id="numeric-to-float"),
    pytest.param(DateTime(), DateTime(timezone=True), id="datetime-timezone"),
    pytest.param(Enum("a", "b", name="kind"), Enum("a", "b", "c", name="kind"), id="enum-member"),
    pytest.param(Uuid(), Uuid(as_uuid=False), id="uuid-as-string"),
    pytest.param(Boolean(), Integer(), id="boolean-to-integer"),
]


@pytest.mark.parametrize(("before", "after"), TYPE_CHANGES)
def test_fingerprint_changes_with_a_column_type_that_stores_another_shape(
    make_base: Any, before: Any, after: Any
) -> None:
    def with_value_type(type_: Any) -> dict[str, Any]:
        return {**BASE_COLUMNS, "value": lambda: mapped_column(type_, nullable=True)}

    assert fingerprint_of(make_base, with_value_type(before)) != fingerprint_of(
        make_base, with_value_type(after)
    )


def test_fingerprint_changes_with_the_codec_version(
    make_base: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A codec that encodes a column differently must never read its old payloads."""
    today = fingerprint_of(make_base)
    monkeypatch.setattr(_codec, "CODEC_VERSION", CODEC_VERSION + 1)

    assert fingerprint_of(make_base) != today


def test_fingerprint_changes_with_the_table(make_base: Any) -> None:
    assert fingerprint_of(make_base, table="items_v2") != fingerprint_of(make_base)


def test_fingerprint_changes_with_the_serializer(make_base: Any) -> None:
    as_json = fingerprint_of(make_base, cache_meta={"serializer": "json"})
    as_msgpack = fingerprint_of(make_base, cache_meta={"serializer": "msgpack"})

    assert as_json != as_msgpack


def test_fingerprint_ignores_what_does_not_shape_a_row(make_base: Any) -> None:
    plain = fingerprint_of(make_base)

    assert fingerprint_of(make_base, cache_meta={"ttl": 5}) == plain
    assert fingerprint_of(make_base, cache_meta={"ttl": 9, "cache_not_found": True}) == plain


def test_schema_change_keeps_every_key_and_the_lineage(make_base: Any) -> None:
    """Issue 14 point 12: two releases share keys and tokens; their payloads tell them apart."""
    old = make_model(make_base())
    new = make_model(
        make_base(),
        id=mapped_column(Integer, primary_key=True),
        name=mapped_column(String(50)),
        note=mapped_column(Text, nullable=True),
    )

    assert keys_of(old).entity_key(("id",), (1,)) == keys_of(new).entity_key(("id",), (1,))
    assert keys_of(old).generation_key == keys_of(new).generation_key
    assert keys_of(old).list_version_key == keys_of(new).list_version_key
    old_print, new_print = fingerprint(inspect(old), "json"), fingerprint(inspect(new), "json")
    assert old_print != new_print
    assert old_print[:LINEAGE_CHARS] == new_print[:LINEAGE_CHARS]


def test_another_table_is_another_lineage(make_base: Any) -> None:
    one = fingerprint_of(make_base)
    other = fingerprint_of(make_base, table="items_v2")
    assert one[:LINEAGE_CHARS] != other[:LINEAGE_CHARS]


FINGERPRINT_MODULE = """
    import enum
    import uuid

    import declcache
    from sqlalchemy import JSON, DateTime, Enum, Numeric, String, Uuid, inspect
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from declcache import CacheManager
    from declcache._keys import KeyBuilder


    class Status(enum.Enum):
        ACTIVE = "active"
        GONE = "gone"


    class Base(DeclarativeBase):
        pass


    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
        code: Mapped[str] = mapped_column(String(40), unique=True)
        status: Mapped[Status] = mapped_column(Enum(Status))
        total = mapped_column(Numeric(12, 2))
        placed = mapped_column(DateTime(timezone=True))
        extra = mapped_column(JSON)

        class CacheMeta:
            ttl = 60
            key_fields = ("code",)


    spec = CacheManager().spec(Order)
    keys = KeyBuilder("dc:", inspect(Order))
    print(declcache.__file__)
    print(spec.fingerprint)
    print(keys.entity_key(("id",), (uuid.UUID(int=1),)))
    print(keys.entity_key(("code",), ("A 1",)))
"""


def test_fingerprint_and_keys_are_stable_across_processes(tmp_path: Path) -> None:
    (tmp_path / "fingerprint_models.py").write_text(
        textwrap.dedent(FINGERPRINT_MODULE), encoding="utf-8"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DECLCACHE_")}
    tree_under_test = Path(declcache.__file__).parent.parent  # not whatever is installed
    path = os.pathsep.join([str(tmp_path), str(tree_under_test)])

    outputs = []
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", "import fingerprint_models"],
            cwd=tmp_path,
            env={**environment, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())

    assert outputs[0] == outputs[1]
    imported, fingerprint, *keys = outputs[0]
    assert Path(imported) == Path(declcache.__file__)
    assert len(fingerprint) >= 8
    assert all(fingerprint not in key and is_backend_safe(key) for key in keys)


# -- issue 14 point 8: a key as the column compares it -----------------------------------------


@pytest.mark.parametrize(
    ("type_", "spellings"),
    [
        (Numeric(10, 2), [Decimal("1.50"), Decimal("1.5"), 1.5, "1.50", Decimal("15E-1")]),
        (Numeric(40, 0), [Decimal("1E+2"), 100, "100", Decimal("100.000")]),
        (Float(), [1.5, Decimal("1.50"), "1.5"]),
        (Integer(), [7, "7", 7.0, Decimal("7.00")]),
        (Boolean(), [True, 1]),
        (
            DateTime(timezone=True),
            [
                dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC),
                dt.datetime(2024, 1, 1, 13, tzinfo=dt.timezone(dt.timedelta(hours=1))),
            ],
        ),
        (String(50, collation="NOCASE"), ["Ada@Example.com", "ada@example.com", "ADA@EXAMPLE.COM"]),
        (postgresql.CITEXT(), ["Ada@Example.com", "ada@example.com"]),
    ],
    ids=[
        "numeric",
        "numeric-wide",
        "float",
        "integer",
        "boolean",
        "timestamptz",
        "nocase",
        "citext",
    ],
)
def test_every_spelling_of_a_value_is_one_key_text(type_: Any, spellings: list[Any]) -> None:
    normalize = _normalizer(type_)
    assert len({normalize(value) for value in spellings}) == 1


def test_distinct_values_stay_distinct() -> None:
    wide = _normalizer(Numeric(60, 40))
    assert wide(Decimal("1." + "0" * 38 + "1")) != wide(Decimal(1))  # no 28-digit rounding
    assert _normalizer(String(collation="NOCASE"))("Ä") != _normalizer(String(collation="NOCASE"))(
        "ä"
    )  # SQLite's NOCASE folds ASCII only
    with pytest.raises(ValueError, match="whole number"):
        _normalizer(Integer())(Decimal("7.5"))


@pytest.mark.parametrize(
    "collation", ["utf8mb4_general_ci", "und-u-ks-level2", "SQL_Latin1_General_CP1_CI_AS"]
)
def test_a_key_on_a_collation_that_cannot_be_reproduced_is_refused(
    make_base: Any, collation: str
) -> None:
    base = make_base()
    model = make_model(
        base,
        {"key_fields": ("email",)},
        id=mapped_column(Integer, primary_key=True),
        email=mapped_column(String(50, collation=collation), unique=True),
    )
    with pytest.raises(
        CacheMetaError, match=r"key_fields: 'email' cannot be a cache key.*collation"
    ):
        read_cache_meta(inspect(model))


@pytest.mark.parametrize("collation", ["C", "utf8mb4_bin", "en_US.utf8", "und-x-icu", "NOCASE"])
def test_a_key_on_a_deterministic_or_known_collation_is_accepted(collation: str) -> None:
    assert collation_problem(String(50, collation=collation)) is None
