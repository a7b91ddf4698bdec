"""``declcache invalidate`` names every key exactly: issue 13 part 3.

``'org_id=7&slug=c++'`` used to invalidate ``slug='c  '`` (URL decoding turned ``+`` into a
space) while reporting success, and a string key holding ``=`` could not be named at all. Each
test caches rows whose keys hold one awkward value next to the row a wrong decoding would name
instead, runs the command (in process) against a real Redis, and checks that exactly the named
entry is gone, the neighbours are still cached, and the output shows the key as the cache
spells it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from declcache import CacheConfig, CacheManager, Lookup
from declcache._keys import Scope
from declcache.cli import main
from tests.integration._cli_key_models import (
    Base,
    Page,
    PageFactory,
    Seat,
    SeatFactory,
    Tag,
    TagFactory,
)
from tests.integration.conftest import delete_redis_keys

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

APP = "tests.integration._cli_key_models"


@pytest.fixture
def config(
    redis_address: tuple[str, int],
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[CacheConfig]:
    """The command's settings (``DECLCACHE_*``) and the same config for the test's manager."""
    host, port = redis_address
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("DECLCACHE_URL", f"redis://{host}:{port}/0")
    monkeypatch.setenv("DECLCACHE_KEY_PREFIX", key_prefix)
    yield CacheConfig.from_env()
    delete_redis_keys(host, port, key_prefix)


@pytest.fixture
def manager(config: CacheConfig) -> CacheManager:
    return CacheManager(config)


def cache_rows(manager: CacheManager, *rows: Any, scope: Scope | None = None) -> None:
    """Insert ``rows`` into a database, load them back and cache them (as a read would)."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()
        for model in {type(row) for row in rows}:
            loaded = session.scalars(select(model)).all()
            stored = manager.set_many(model, loaded, scope=scope or Scope())
            assert stored == len(loaded)
    engine.dispose()


def invalidate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["invalidate", APP, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cached(manager: CacheManager, model: type, ident: Any, scope: Scope | None = None) -> bool:
    return manager.get(model, ident, scope=scope or Scope()) is not Lookup.MISS


# -- the issue's example -------------------------------------------------------------------------


def test_the_issue_example_invalidates_c_plus_plus_and_not_c_space_space(
    manager: CacheManager, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_rows(manager, PageFactory(id=1, slug="c++"), PageFactory(id=2, slug="c  "))

    code, out, _err = invalidate(capsys, "Page", "org_id=7&slug=c++")

    assert code == 0
    assert "invalidated 1 key(s) of Page" in out
    assert '{"org_id": "7", "slug": "c++"}' in out  # what was invalidated, as the cache keys it
    assert not cached(manager, Page, {"org_id": 7, "slug": "c++"})
    assert not cached(manager, Page, 1)
    assert cached(manager, Page, 2)
    assert cached(manager, Page, {"org_id": 7, "slug": "c  "})


@pytest.mark.parametrize(
    "spelling",
    [
        ["--json", '{"org_id": 7, "slug": "c++"}'],
        ["--field", "org_id=7", "--field", "slug=c++"],
        ["-f", "slug=c++", "-f", "org_id=7"],
    ],
    ids=["json", "fields", "fields-any-order"],
)
def test_a_key_set_by_json_or_fields(
    manager: CacheManager, capsys: pytest.CaptureFixture[str], spelling: list[str]
) -> None:
    cache_rows(manager, PageFactory(id=1, slug="c++"), PageFactory(id=2, slug="c  "))

    code, out, err = invalidate(capsys, "Page", *spelling)

    assert code == 0, err
    assert "invalidated 1 key(s) of Page" in out
    assert not cached(manager, Page, 1)
    assert cached(manager, Page, 2)


# -- every awkward value in a string primary key ------------------------------------------------

AWKWARD = {
    "plus": ("a+b", "a b"),
    "equals": ("a=b", "a"),
    "ampersand": ("a&b", "a"),
    "percent": ("100%25", "100%"),
    "space": ("two words", "two+words"),
    "unicode": ("zoë 日本 😀", "zo"),
    "quotes": ('it\'s "quoted"', "its quoted"),
    "leading-zeros": ("007", "7"),
    "code-equals": ("code=x", "x"),
}


#: Every spelling of every value; ``code=x`` as a KEY is the short form of the field ``code``.
SPELLINGS = [
    pytest.param(case, how, id=f"{case}-{how}")
    for case in AWKWARD
    for how in ("positional", "json", "field")
    if (case, how) != ("code-equals", "positional")
]


@pytest.mark.parametrize(("case", "how"), SPELLINGS)
def test_a_string_key_holding_an_awkward_value(
    manager: CacheManager, capsys: pytest.CaptureFixture[str], case: str, how: str
) -> None:
    value, neighbour = AWKWARD[case]
    cache_rows(manager, TagFactory(code=value), TagFactory(code=neighbour))
    args = {
        "positional": [value],
        "json": ["--json", json.dumps(value)],
        "field": ["--field", f"code={value}"],
    }[how]

    code, out, err = invalidate(capsys, "Tag", *args)

    assert code == 0, err
    assert json.dumps({"code": value}, ensure_ascii=False) in out
    assert not cached(manager, Tag, value)
    assert cached(manager, Tag, neighbour)


def test_the_short_form_names_the_field_when_the_text_before_equals_is_a_column(
    manager: CacheManager, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_rows(manager, TagFactory(code="x"), TagFactory(code="code=x"))

    code, out, _err = invalidate(capsys, "Tag", "code=x")

    assert code == 0
    assert '{"code": "x"}' in out  # said, so a surprise is visible
    assert not cached(manager, Tag, "x")
    assert cached(manager, Tag, "code=x")


# -- composite primary keys and integer keys ---------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ["--field", "row=A&1", "--field", "number=7"],
        ["--json", '["A&1", 7]'],
        ["--json", '{"number": "7", "row": "A&1"}'],
    ],
    ids=["fields", "json-array", "json-object-int-as-text"],
)
def test_a_composite_primary_key(
    manager: CacheManager, capsys: pytest.CaptureFixture[str], spelling: list[str]
) -> None:
    cache_rows(manager, SeatFactory(row="A&1", number=7), SeatFactory(row="A", number=7))

    code, out, err = invalidate(capsys, "Seat", *spelling)

    assert code == 0, err
    assert "invalidated 1 key(s) of Seat" in out
    assert not cached(manager, Seat, ("A&1", 7))
    assert cached(manager, Seat, ("A", 7))


@pytest.mark.parametrize(
    "spelling",
    [["42"], ["--json", '"42"'], ["--json", "42"], ["--field", "id=042"], ["--json", "[42]"]],
    ids=["positional", "json-text", "json-number", "field-leading-zeros", "json-array"],
)
def test_an_integer_key_given_as_text(
    manager: CacheManager, capsys: pytest.CaptureFixture[str], spelling: list[str]
) -> None:
    cache_rows(manager, PageFactory(id=42), PageFactory(id=4))

    code, out, err = invalidate(capsys, "Page", *spelling)

    assert code == 0, err
    assert '{"id": "42"}' in out
    assert not cached(manager, Page, 42)
    assert cached(manager, Page, 4)


def test_several_keys_in_one_command(
    manager: CacheManager, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_rows(manager, *(TagFactory(code=code) for code in ("a", "b=c", "d&e", "f")))

    code, out, _err = invalidate(capsys, "Tag", "a", "--json", '"b=c"', "--field", "code=d&e")

    assert code == 0
    assert "invalidated 3 key(s) of Tag" in out
    assert [cached(manager, Tag, code) for code in ("a", "b=c", "d&e", "f")] == [
        False,
        False,
        False,
        True,
    ]


# -- scope and schema ---------------------------------------------------------------------------


def test_scope_names_the_tenant_whose_entry_is_dropped(
    manager: CacheManager, capsys: pytest.CaptureFixture[str]
) -> None:
    acme, globex = Scope(name="acme"), Scope(name="globex")
    cache_rows(manager, TagFactory(code="t"), scope=acme)
    cache_rows(manager, TagFactory(code="t"), scope=globex)

    code, out, err = invalidate(capsys, "Tag", "t", "--scope", "acme")

    assert code == 0, err
    assert "in scope 'acme'" in out
    assert not cached(manager, Tag, "t", acme)
    assert cached(manager, Tag, "t", globex)


def test_schema_names_the_schema_whose_entries_are_dropped(
    manager: CacheManager, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant_b = Scope(schema="tenant_b")
    cache_rows(manager, TagFactory(code="t"), TagFactory(code="u"), scope=tenant_b)
    cache_rows(manager, TagFactory(code="t"))

    code, out, err = invalidate(capsys, "Tag", "--schema", "tenant_b")

    assert code == 0, err
    assert "every cached entity and list of Tag in schema tenant_b" in out
    assert not cached(manager, Tag, "t", tenant_b)
    assert not cached(manager, Tag, "u", tenant_b)
    assert cached(manager, Tag, "t")


# -- what cannot be read is refused, never guessed ----------------------------------------------


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("Page", ["org_id=7&slug=a&b"], "cannot read 'b'"),
        ("Page", ["--json", "{nope"], "is not JSON"),
        ("Page", ["--json", "null"], "expected an object of fields"),
        ("Page", ["--field", "slug"], "expected --field NAME=VALUE"),
        ("Page", ["--field", "slug=a", "--field", "slug=b"], "'slug' is given twice"),
        ("Page", ["abc"], "'abc' is not a valid key of Page"),
        (
            "Page",
            ["--field", "slug=c++"],
            "['slug'] is not a key of Page; keys are id | org_id,slug",
        ),
        ("Seat", ["7"], "Seat has a composite primary key: --field row=… --field number=…"),
        ("Seat", ["--json", '["A"]'], "is not a valid key of Seat"),
    ],
)
def test_a_key_that_cannot_be_read_exits_2(
    config: CacheConfig,
    capsys: pytest.CaptureFixture[str],
    model: str,
    args: list[str],
    message: str,
) -> None:
    code, out, err = invalidate(capsys, model, *args)

    assert code == 2
    assert message in err.replace("\n", " ")
    assert "invalidated" not in out
