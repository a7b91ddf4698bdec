"""The I/O-free core: read and invalidation flows decided from raw values, no backend at all.

A flow yields the store calls it needs and is sent their results; these tests play the
backend by hand, so each decision — hit, miss, which token to create, which pointer to
follow, what to fill against, what an invalidation writes — is shown without I/O, and the
same flow is what :func:`declcache._driver.run` and :func:`~declcache._driver.arun` drive.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import String, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from declcache import CacheManager, Lookup, _invalidation, _reads
from declcache._driver import LOAD, Call, Flow, arun, run
from declcache._keys import KeyBuilder, Scope
from declcache._model_cache import ModelCache
from declcache._payload import ENTITY, POINTER, Payloads
from declcache._stats import FaultLog


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "flow_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)

    class CacheMeta:
        ttl = 300
        key_fields = ("email",)


@pytest.fixture(params=[False, True], ids=["unnamed", "named-scopes"])
def named_scopes(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def cache(named_scopes: bool) -> ModelCache:
    spec = CacheManager().spec(Member)
    assert spec is not None
    keys = KeyBuilder("t:", inspect(Member), spec.key_fields)
    return ModelCache(
        spec,
        keys,
        None,  # type: ignore[arg-type]  # no region: nothing here reaches a backend
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        server_ttl=360,
        max_value_bytes=1 << 20,
        faults=FaultLog(logging.getLogger("test")),
        on_stats=None,
        named_scopes=named_scopes,
    )


def play(flow: Flow[Any], answers: list[Any]) -> tuple[list[Call], Any]:
    """Run ``flow``, answering its calls in order with ``answers``; the calls and the result.

    An answer that is an exception is raised into the flow, as a failing store call is.
    """
    calls: list[Call] = []
    answer: Any = None
    try:
        call = next(flow)
        while True:
            calls.append(call)
            answer = answers.pop(0)
            call = flow.throw(answer) if isinstance(answer, Exception) else flow.send(answer)
    except StopIteration as done:
        assert not answers, f"unused answers: {answers}"
        return calls, done.value


def entity(cache: ModelCache, generation: str, ident: int, email: str) -> bytes:
    return cache.payloads.dump(generation, ENTITY, *[ident, email])


def test_a_hit_is_one_look_up_of_the_token_and_the_key(cache: ModelCache) -> None:
    token = Payloads.token_value("g1")
    calls, probe = play(_reads.probe(cache, [7]), [[token, entity(cache, "g1", 7, "a@b.c")]])

    assert [(call.method, call.args) for call in calls] == [
        ("get_many", ([cache.keys.generation_key, cache.keys.of_ident(7)[1]],))
    ]
    (found,) = probe.results
    assert (found.id, found.email) == (7, "a@b.c")
    assert cache.counters.snapshot().hits == 1


def test_an_entry_of_an_older_generation_is_a_miss(cache: ModelCache) -> None:
    token = Payloads.token_value("g2")
    _, probe = play(_reads.probe(cache, [7]), [[token, entity(cache, "g1", 7, "a@b.c")]])

    assert probe.results == [Lookup.MISS]
    assert probe.ticket is not None
    assert probe.ticket.generation == "g2"


def test_no_generation_token_yet_creates_one_set_if_absent(cache: ModelCache) -> None:
    calls, probe = play(_reads.probe(cache, [7]), [[None, None], True])

    assert [call.method for call in calls] == ["get_many", "add"]
    key, value, ttl = calls[1].args
    assert key == cache.keys.generation_key
    assert ttl == cache.token_ttl
    assert probe.ticket is not None
    assert Payloads.token_value(probe.ticket.generation)[-16:] == value[-16:]
    assert probe.results == [Lookup.MISS]


def test_a_key_set_entry_is_a_pointer_followed_in_a_second_look_up(cache: ModelCache) -> None:
    token = Payloads.token_value("g1")
    pointer = cache.payloads.dump("g1", POINTER, "7")
    calls, probe = play(
        _reads.probe(cache, [{"email": "a@b.c"}]),
        [[token, pointer], [entity(cache, "g1", 7, "a@b.c")]],
    )

    primary = cache.keys.of_ident(7)[1]
    assert [(call.method, call.args) for call in calls][1] == ("get_many", ([primary],))
    assert probe.results[0].id == 7
    assert probe.ticket is not None
    assert primary in probe.ticket.observed  # a fill compares against the entity key too


def test_a_store_fault_answers_every_ident_as_a_miss(cache: ModelCache) -> None:
    _, probe = play(_reads.probe(cache, [1, 2]), [ConnectionError("down")])

    assert probe.results == [Lookup.MISS, Lookup.MISS]
    assert probe.ticket is None  # nothing to fill against
    assert cache.counters.snapshot().errors == 1


def test_a_miss_loads_then_fills_against_what_the_look_up_saw(cache: ModelCache) -> None:
    tombstone = cache.payloads.tombstone()
    seen = [Payloads.token_value("g1"), tombstone]
    loaded = Member(id=7, email="a@b.c")
    inspect(loaded).info["_declcache_loaded_at"] = float("inf")  # read after the look-up

    calls, results = play(_reads.load(cache, Member, [7], None), [seen, [loaded], [True, True]])

    assert [call.method for call in calls] == ["get_many", LOAD, "compare_and_set"]
    assert calls[1].args == ([7],)
    swaps = {key: expected for key, expected, _ in calls[2].args[0]}
    assert swaps == {
        cache.keys.of_ident(7)[1]: tombstone,
        cache.keys.of_ident({"email": "a@b.c"})[1]: None,
    }
    assert results == [loaded]


def test_a_row_read_before_the_look_up_is_returned_not_cached(cache: ModelCache) -> None:
    loaded = Member(id=7, email="a@b.c")  # never stamped by a load: as old as anything

    calls, results = play(
        _reads.load(cache, Member, [7], None), [[Payloads.token_value("g1"), None], [loaded]]
    )

    assert [call.method for call in calls] == ["get_many", LOAD]
    assert results == [loaded]
    assert cache.counters.snapshot().fills_refused == 1


def test_an_invalidation_is_one_write_of_tombstones_and_tokens(
    cache: ModelCache, named_scopes: bool
) -> None:
    change = _invalidation.ModelChanges(keys={(("id",), (7,)), (("email",), ("a@b.c",))})
    # with a scope function, a write outside every named scope reaches them through these
    outside = {cache.keys.outside_generation_key, cache.keys.outside_list_version_key}

    calls, _ = play(_invalidation.invalidate(cache, change), [None])

    (call,) = calls
    assert call.method == "write_many"
    written = {key: ttl for key, _, ttl in call.args[0]}
    assert written == {
        cache.keys.of_ident(7)[1]: cache.server_ttl,
        cache.keys.of_ident({"email": "a@b.c"})[1]: cache.server_ttl,
        cache.keys.list_version_key: cache.token_ttl,
        **dict.fromkeys(outside if named_scopes else (), cache.token_ttl),
    }
    whole = _invalidation.ModelChanges(whole_model=True)
    calls, _ = play(_invalidation.invalidate(cache, whole), [None])
    assert {key for key, _, _ in calls[0].args[0]} == {
        cache.keys.list_version_key,
        cache.keys.generation_key,
        *(outside if named_scopes else ()),
    }


def test_a_scope_has_keys_of_its_own_and_reads_the_outside_token(cache: ModelCache) -> None:
    tenant = cache.scoped(Scope(name="acme"))
    schema = cache.scoped(Scope("tenant_b"))
    both = cache.scoped(Scope("tenant_b", "acme"))
    everyone = [cache, tenant, schema, both]

    assert len({view.keys.of_ident(7)[1] for view in everyone}) == 4
    assert len({view.keys.list_key("list:x") for view in everyone}) == 4
    assert cache.scoped(Scope(name="acme")) is tenant  # built once
    assert tenant.store is cache.store
    assert tenant.counters is cache.counters
    token = Payloads.token_value("g1")
    outside = Payloads.token_value("o1")
    calls, probe = play(
        _reads.probe(tenant, [7]), [[token, outside, entity(cache, "g1|o1", 7, "a@b.c")]]
    )
    assert calls[0].args == (
        [tenant.keys.generation_key, cache.keys.outside_generation_key, tenant.keys.of_ident(7)[1]],
    )
    assert probe.results[0].id == 7
    _, probe = play(  # a write outside the named scopes replaced the outside token
        _reads.probe(tenant, [7]),
        [[token, Payloads.token_value("o2"), entity(cache, "g1|o1", 7, "a@b.c")]],
    )
    assert probe.results == [Lookup.MISS]


def test_a_write_in_a_scope_reaches_it_and_the_unnamed_view_only(cache: ModelCache) -> None:
    acme = Scope(name="acme")
    change = _invalidation.ModelChanges(keys={(("id",), (7,))}, scopes={acme})

    calls, _ = play(_invalidation.invalidate(cache, change), [None])

    written = {key for key, _, _ in calls[0].args[0]}
    tenant = cache.scoped(acme)
    assert written == {
        tenant.keys.of_ident(7)[1],
        tenant.keys.list_version_key,
        cache.keys.of_ident(7)[1],
        cache.keys.list_version_key,
    }
    assert cache.scoped(Scope(name="globex")).keys.of_ident(7)[1] not in written


def test_a_write_outside_the_named_scopes_reaches_them_all(
    cache: ModelCache, named_scopes: bool
) -> None:
    change = _invalidation.ModelChanges(keys={(("id",), (7,))}, scopes={Scope()})

    calls, _ = play(_invalidation.invalidate(cache, change), [None])

    written = {key for key, _, _ in calls[0].args[0]}
    outside = {cache.keys.outside_generation_key, cache.keys.outside_list_version_key}
    assert {cache.keys.of_ident(7)[1], cache.keys.list_version_key} <= written
    # only when named scopes can exist: without a scope function nobody reads those tokens
    assert (outside <= written) is named_scopes
    assert bool(outside & written) is named_scopes


class DictStore:
    """The smallest store: what ``run`` and ``arun`` call, on a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.data.get(key) for key in keys]

    def add(self, key: str, value: bytes, ttl: int) -> bool:
        return self.data.setdefault(key, value) is value


class AsyncDictStore(DictStore):
    async def get_many(self, keys: list[str]) -> list[bytes | None]:  # type: ignore[override]
        return super().get_many(keys)

    async def add(self, key: str, value: bytes, ttl: int) -> bool:  # type: ignore[override]
        return super().add(key, value, ttl)


async def test_the_same_flow_runs_on_a_sync_and_an_async_store(cache: ModelCache) -> None:
    sync_store, async_store = DictStore(), AsyncDictStore()

    sync = run(_reads.probe(cache, [7]), sync_store)  # type: ignore[arg-type]
    awaited = await arun(_reads.probe(cache, [7]), async_store)  # type: ignore[arg-type]

    assert sync.results == awaited.results == [Lookup.MISS]
    assert set(sync_store.data) == set(async_store.data) == {cache.keys.generation_key}
