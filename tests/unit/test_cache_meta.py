"""Declaring a model's cache (API.md §1, issue 3 point 3): CacheMeta, inheritance, precedence.

Models are built on the ``base`` fixture (a fresh registry, disposed after the test), because a
bad CacheMeta makes ``configure_mappers()`` fail for every registry until it is disposed.
"""

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Index,
    Integer,
    PickleType,
    String,
    UniqueConstraint,
    create_engine,
    select,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    configure_mappers,
    mapped_column,
)

from declcache import (
    CacheConfig,
    CacheManager,
    CacheMetaError,
    ConfigurationError,
    DeclCacheError,
    ModelSpec,
    SettingsError,
    _meta,
)
from declcache._meta import OPTIONS, FromSetting, check_override


def origin(source: str) -> str:
    """``"Child.CacheMeta"`` for a class defined inside a test function."""
    return source.rpartition("<locals>.")[2]


def make_user(base: type[DeclarativeBase], **cache_meta: Any) -> type:
    """``User(id, email unique, name)`` with a CacheMeta holding ``cache_meta`` (if any).

    Keep the returned class referenced until ``configure_mappers()`` has run: a registry holds
    its classes weakly, so an unreferenced model may be garbage-collected before it is read.
    """
    namespace: dict[str, Any] = {
        "__tablename__": "users",
        "id": mapped_column(Integer, primary_key=True),
        "email": mapped_column(String(200), unique=True),
        "name": mapped_column(String(100)),
    }
    if cache_meta:
        namespace["CacheMeta"] = type("CacheMeta", (), cache_meta)
    return type("User", (base,), namespace)


def spec_of(model: type, config: CacheConfig | None = None) -> ModelSpec:
    spec = CacheManager(config).spec(model)
    assert spec is not None, f"{model.__name__} should be cached"
    return spec


# -- reading ---------------------------------------------------------------------------------


def test_cache_meta_is_read_with_every_documented_attribute(base: type[DeclarativeBase]) -> None:
    class User(base):  # type: ignore[misc,valid-type]
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(unique=True)
        name: Mapped[str]

        class CacheMeta:
            ttl = 300
            enabled = True
            serializer = "json"
            key_fields = ("email",)
            cache_not_found = True
            cached_relationships = ()
            allow_pickle = False

    configure_mappers()
    spec = spec_of(User)

    assert spec.model is User
    assert (spec.ttl, spec.enabled, spec.serializer, spec.cache_not_found) == (
        300,
        True,
        "json",
        True,
    )
    assert spec.key_fields == (("id",), ("email",))
    assert (spec.cached_relationships, spec.allow_pickle) == ((), False)
    assert spec.primary_key == ("id",)
    assert {origin(source) for source in spec.sources.values()} == {"User.CacheMeta"}
    assert CacheManager().is_cached(User)


def test_defaults_once_a_cache_meta_exists(base: type[DeclarativeBase]) -> None:
    user = make_user(base, __doc__="Cache users; a docstring is not an attribute.")

    spec = spec_of(user)

    assert (spec.ttl, spec.enabled, spec.serializer, spec.cache_not_found) == (
        3600,
        True,
        "json",
        False,
    )
    assert spec.key_fields == (("id",),)
    assert set(spec.sources.values()) == {"default"}


def test_model_without_cache_meta_is_not_cached(base: type[DeclarativeBase]) -> None:
    user = make_user(base)
    manager = CacheManager()

    assert manager.spec(user) is None
    assert not manager.is_cached(user)


def test_enabled_false_turns_the_model_off(base: type[DeclarativeBase]) -> None:
    user = make_user(base, ttl=60, enabled=False)
    manager = CacheManager()

    spec = manager.spec(user)

    assert spec is not None
    assert spec.enabled is False
    assert not manager.is_cached(user)


def test_bad_cache_meta_fails_configure_mappers(base: type[DeclarativeBase]) -> None:
    user = make_user(base, ttl=-1)

    with pytest.raises(CacheMetaError, match=r"User\.CacheMeta\.ttl") as excinfo:
        configure_mappers()

    assert excinfo.value.model == user.__name__


def test_bad_cache_meta_fails_the_first_query(base: type[DeclarativeBase]) -> None:
    user = make_user(base, tll=5)
    engine = create_engine("sqlite://")

    with Session(engine) as session, pytest.raises(CacheMetaError, match="'ttl'"):
        session.execute(select(user))
    engine.dispose()


# -- inheritance -----------------------------------------------------------------------------


def test_cache_meta_is_inherited_from_a_mixin(base: type[DeclarativeBase]) -> None:
    class CachedMixin:
        class CacheMeta:
            ttl = 120
            serializer = "msgpack"

    class Tag(CachedMixin, base):  # type: ignore[misc,valid-type]
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)

    spec = spec_of(Tag)

    assert (spec.ttl, spec.serializer) == (120, "msgpack")
    assert origin(spec.sources["ttl"]) == "CachedMixin.CacheMeta"
    assert origin(spec.sources["serializer"]) == "CachedMixin.CacheMeta"


def test_cache_meta_is_inherited_from_an_abstract_base(base: type[DeclarativeBase]) -> None:
    class Cached(base):  # type: ignore[misc,valid-type]
        __abstract__ = True

        class CacheMeta:
            ttl = 45

    class Tag(Cached):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Plain(base):  # type: ignore[misc,valid-type]
        __tablename__ = "plain"
        id: Mapped[int] = mapped_column(primary_key=True)

    assert spec_of(Tag).ttl == 45
    assert origin(spec_of(Tag).sources["ttl"]) == "Cached.CacheMeta"
    assert CacheManager().spec(Plain) is None


def test_nested_cache_meta_overrides_its_parent_field_by_field(
    base: type[DeclarativeBase],
) -> None:
    class Cached(base):  # type: ignore[misc,valid-type]
        __abstract__ = True

        class CacheMeta:
            ttl = 600
            serializer = "msgpack"
            cache_not_found = True

    class Account(Cached):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        login: Mapped[str] = mapped_column(unique=True)

        class CacheMeta(Cached.CacheMeta):
            ttl = 30
            key_fields = ("login",)

    spec = spec_of(Account)

    assert (spec.ttl, spec.serializer, spec.cache_not_found) == (30, "msgpack", True)
    assert spec.key_fields == (("id",), ("login",))
    assert {name: origin(source) for name, source in spec.sources.items()} == {
        "ttl": "Account.CacheMeta",
        "key_fields": "Account.CacheMeta",
        "serializer": "Cached.CacheMeta",
        "cache_not_found": "Cached.CacheMeta",
        "enabled": "default",
        "cached_relationships": "default",
        "allow_pickle": "default",
    }


def test_a_plain_nested_cache_meta_replaces_the_parents(base: type[DeclarativeBase]) -> None:
    class Cached(base):  # type: ignore[misc,valid-type]
        __abstract__ = True

        class CacheMeta:
            ttl = 600
            serializer = "msgpack"

    class Account(Cached):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)

        class CacheMeta:
            ttl = 30

    spec = spec_of(Account)

    assert (spec.ttl, spec.serializer) == (30, "json")
    assert spec.sources["serializer"] == "default"


def test_a_subclass_can_switch_caching_off(base: type[DeclarativeBase]) -> None:
    class Cached(base):  # type: ignore[misc,valid-type]
        __abstract__ = True

        class CacheMeta:
            ttl = 600

    class Audit(Cached):
        __tablename__ = "audits"
        id: Mapped[int] = mapped_column(primary_key=True)

        class CacheMeta(Cached.CacheMeta):
            enabled = False

    spec = spec_of(Audit)

    assert (spec.enabled, spec.ttl) == (False, 600)
    assert not CacheManager().is_cached(Audit)


# -- key_fields ------------------------------------------------------------------------------


def test_composite_unique_constraint_and_unique_index_are_keys(
    base: type[DeclarativeBase],
) -> None:
    class Page(base):  # type: ignore[misc,valid-type]
        __tablename__ = "pages"
        __table_args__ = (
            UniqueConstraint("site", "slug"),
            Index("ix_pages_code", "code", unique=True),
        )
        id: Mapped[int] = mapped_column(primary_key=True)
        site: Mapped[int]
        slug: Mapped[str]
        code: Mapped[str]
        email: Mapped[str] = mapped_column(unique=True)

        class CacheMeta:
            key_fields = (("email",), ("slug", "site"), ("code",), ("id",))

    assert spec_of(Page).key_fields == (("id",), ("email",), ("slug", "site"), ("code",))


def test_key_fields_as_a_single_name(base: type[DeclarativeBase]) -> None:
    user = make_user(base, key_fields="email")

    assert spec_of(user).key_fields == (("id",), ("email",))


def test_key_fields_name_attributes_not_database_columns(base: type[DeclarativeBase]) -> None:
    class Person(base):  # type: ignore[misc,valid-type]
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column("email_address", unique=True)

        class CacheMeta:
            key_fields = ("email",)

    assert spec_of(Person).key_fields == (("id",), ("email",))


def test_composite_primary_key_is_the_default_key(base: type[DeclarativeBase]) -> None:
    class Membership(base):  # type: ignore[misc,valid-type]
        __tablename__ = "memberships"
        org_id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(primary_key=True)
        role: Mapped[str]

        class CacheMeta:
            ttl = 10

    assert spec_of(Membership).key_fields == (("org_id", "user_id"),)


def test_key_field_that_is_a_sql_expression_is_rejected(base: type[DeclarativeBase]) -> None:
    class Item(base):  # type: ignore[misc,valid-type]
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(unique=True)

        class CacheMeta:
            key_fields = ("upper_name",)

    Item.upper_name = column_property(Item.__table__.c.name + "!")

    with pytest.raises(CacheMetaError) as excinfo:
        configure_mappers()

    assert excinfo.value.attribute == "key_fields"
    assert "'upper_name' is not a column of Item" in str(excinfo.value)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "attribute", "expected"),
    [
        pytest.param({"tll": 5}, "tll", "did you mean 'ttl'?", id="typo-ttl"),
        pytest.param(
            {"cache_not_fuond": True},
            "cache_not_fuond",
            "did you mean 'cache_not_found'?",
            id="typo-cache_not_found",
        ),
        pytest.param(
            {"key_field": ("id",)}, "key_field", "did you mean 'key_fields'?", id="typo-key"
        ),
        pytest.param(
            {"colour": "red"},
            "colour",
            "(known: ttl, enabled, serializer, key_fields, cache_not_found, "
            "cached_relationships, allow_pickle)",
            id="unknown-attribute",
        ),
        pytest.param(
            {"key_fields": ("emial",)},
            "key_fields",
            "'emial' is not a column of User; did you mean 'email'?",
            id="key-not-a-column",
        ),
        pytest.param(
            {"key_fields": (("email",), ("id", "nmae"))},
            "key_fields",
            "did you mean 'name'?",
            id="second-key-not-a-column",
        ),
        pytest.param(
            {"key_fields": ("zzz",)},
            "key_fields",
            "columns are ['id', 'email', 'name']",
            id="key-not-a-column-no-hint",
        ),
        pytest.param(
            {"key_fields": ("name",)},
            "key_fields",
            "('name',) is not unique",
            id="key-not-unique",
        ),
        pytest.param(
            {"key_fields": ("name", "email")},
            "key_fields",
            "('name', 'email') is not unique",
            id="composite-key-not-a-constraint",
        ),
        pytest.param({"key_fields": ()}, "key_fields", "expected a tuple", id="key-empty"),
        pytest.param({"key_fields": 5}, "key_fields", "expected a tuple", id="key-int"),
        pytest.param({"ttl": -1}, "ttl", "positive whole number", id="ttl-negative"),
        pytest.param({"ttl": 0}, "ttl", "enabled = False", id="ttl-zero"),
        pytest.param({"ttl": True}, "ttl", "got True", id="ttl-bool"),
        pytest.param({"ttl": 1.5}, "ttl", "got 1.5", id="ttl-float"),
        pytest.param({"ttl": "60"}, "ttl", "got '60'", id="ttl-str"),
        pytest.param({"ttl": None}, "ttl", "got None", id="ttl-none"),
        pytest.param({"ttl": 10**10}, "ttl", "ten years", id="ttl-a-unit-mistake"),
        pytest.param(
            {"serializer": "yaml"},
            "serializer",
            "unknown serializer 'yaml'; expected 'json', 'msgpack' or 'package.module:name'",
            id="serializer-unknown-name",
        ),
        pytest.param(
            {"serializer": "no.such.module:x"},
            "serializer",
            "cannot import module 'no.such.module'",
            id="serializer-unimportable",
        ),
        pytest.param(
            {"serializer": "json:nope"},
            "serializer",
            "module 'json' has no attribute 'nope'",
            id="serializer-missing-attribute",
        ),
        pytest.param(
            {"serializer": "json:dumps"},
            "serializer",
            "neither a (dumps, loads) pair nor an object with dumps() and loads()",
            id="serializer-not-a-format",
        ),
        pytest.param(
            {"serializer": (json.dumps,)},
            "serializer",
            "neither a (dumps, loads) pair",
            id="serializer-half-pair",
        ),
        pytest.param({"enabled": 1}, "enabled", "expected True or False, got 1", id="enabled-1"),
        pytest.param(
            {"enabled": "no"}, "enabled", "expected True or False, got 'no'", id="enabled-str"
        ),
        pytest.param(
            {"cache_not_found": "yes"}, "cache_not_found", "expected True or False", id="cnf"
        ),
    ],
)
def test_invalid_cache_meta_names_model_attribute_and_expectation(
    base: type[DeclarativeBase], meta: dict[str, Any], attribute: str, expected: str
) -> None:
    user = make_user(base, **meta)

    with pytest.raises(CacheMetaError) as excinfo:
        configure_mappers()

    error = excinfo.value
    assert error.model == user.__name__
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, ValueError)
    assert isinstance(error, DeclCacheError)
    assert error.attribute == attribute
    assert str(error).startswith(f"User.CacheMeta.{attribute}: ")
    assert expected in str(error)


def test_cache_meta_that_is_not_a_class(base: type[DeclarativeBase]) -> None:
    class User(base):  # type: ignore[misc,valid-type]
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        CacheMeta = {"ttl": 5}  # noqa: RUF012 - the mistake under test

    with pytest.raises(CacheMetaError) as excinfo:
        configure_mappers()

    assert (excinfo.value.model, excinfo.value.attribute) == ("User", "CacheMeta")
    assert "expected a nested class" in str(excinfo.value)


def test_serializer_module_that_cannot_be_imported_for_another_reason(
    base: type[DeclarativeBase], write_module: Any
) -> None:
    module = write_module("declcache_test_broken_fmt", "def dumps(:\n")
    user = make_user(base, serializer=f"{module}:dumps")

    with pytest.raises(CacheMetaError, match="serializer") as excinfo:
        configure_mappers()

    assert excinfo.value.model == user.__name__


# -- serializers -----------------------------------------------------------------------------


def _roundtrips(spec: ModelSpec) -> bool:
    data = [1, "zoë", None, [True, 2.5], {"k": "v"}]
    payload = spec.format.dumps(data)
    return spec.format.loads(payload.encode() if isinstance(payload, str) else payload) == data


def test_serializer_names_and_objects_are_accepted(make_base: Any, write_module: Any) -> None:
    module = write_module(
        "declcache_test_formats",
        """
        import json

        class Compact:
            def dumps(self, obj):
                return json.dumps(obj, separators=(",", ":")).encode()

            def loads(self, data):
                return json.loads(data)

        FORMAT = Compact()
        PAIR = (json.dumps, json.loads)
        """,
    )
    cases = [
        ("json", "json"),
        ("msgpack", "msgpack"),
        (f"{module}:FORMAT", f"{module}:FORMAT"),
        (f"{module}:PAIR", f"{module}:PAIR"),
        (f"{module}:Compact", f"{module}:Compact"),
        ((json.dumps, json.loads), "pair:json:dumps"),
    ]
    for serializer, name in cases:
        user = make_user(make_base(), serializer=serializer)
        spec = spec_of(user)
        assert spec.serializer == name
        assert _roundtrips(spec), serializer


# -- precedence ------------------------------------------------------------------------------


def test_explicit_models_override_beats_cache_meta(base: type[DeclarativeBase]) -> None:
    user = make_user(base, ttl=300, serializer="msgpack")

    spec = spec_of(user, CacheConfig(models={"users": {"ttl": 5, "cache_not_found": True}}))

    assert (spec.ttl, spec.cache_not_found, spec.serializer) == (5, True, "msgpack")
    assert spec.sources["ttl"] == spec.sources["cache_not_found"] == "CacheConfig.models[users]"
    assert origin(spec.sources["serializer"]) == "CacheMeta"


@pytest.mark.parametrize("name", ["User", "users"], ids=["class-name", "table-name"])
def test_declcache_models_beats_cache_meta(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("DECLCACHE_MODELS", json.dumps({name: {"ttl": 7, "enabled": False}}))
    user = make_user(base, ttl=300, enabled=True)
    manager = CacheManager(CacheConfig.from_env())

    spec = manager.spec(user)

    assert spec is not None
    assert (spec.ttl, spec.enabled) == (7, False)
    assert spec.sources["ttl"] == f"DECLCACHE_MODELS[{name}]"
    assert not manager.is_cached(user)


def test_override_of_another_model_changes_nothing(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECLCACHE_MODELS", '{"orders": {"ttl": 7}}')

    assert spec_of(make_user(base, ttl=300), CacheConfig.from_env()).ttl == 300


def test_explicit_models_beat_declcache_models(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECLCACHE_MODELS", '{"users": {"ttl": 7}}')
    user = make_user(base, ttl=300)

    spec = spec_of(user, CacheConfig.from_env(models={"users": {"ttl": 9}}))

    assert spec.ttl == 9
    assert spec.sources["ttl"] == "CacheConfig.models[users]"


def test_cache_meta_beats_the_other_variables(
    make_base: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECLCACHE_EXPIRATION_TIME", "60")
    monkeypatch.setenv("DECLCACHE_SERIALIZER", "msgpack")
    config = CacheConfig.from_env()

    declared = spec_of(make_user(make_base(), ttl=300, serializer="json"), config)
    inherited = spec_of(make_user(make_base(), cache_not_found=False), config)

    assert (declared.ttl, declared.serializer) == (300, "json")
    assert origin(declared.sources["ttl"]) == "CacheMeta"
    assert (inherited.ttl, inherited.serializer) == (60, "msgpack")
    assert inherited.sources["ttl"] == "DECLCACHE_EXPIRATION_TIME"
    assert inherited.sources["serializer"] == "DECLCACHE_SERIALIZER"


def test_explicit_default_ttl_reaches_models_without_one(base: type[DeclarativeBase]) -> None:
    spec = spec_of(make_user(base, enabled=True), CacheConfig(expiration_time=90))

    assert spec.ttl == 90
    assert spec.sources["ttl"] == "CacheConfig(expiration_time=...)"


@pytest.mark.parametrize(
    ("override", "attribute", "expected"),
    [
        ({"ttl": -1}, "ttl", "positive whole number"),
        ({"ttl": "soon"}, "ttl", "got 'soon'"),
        ({"tll": 5}, "tll", "did you mean 'ttl'?"),
        ({"enabled": "off"}, "enabled", "expected True or False"),
        ({"key_fields": ["name"]}, "key_fields", "is not unique"),
        ({"key_fields": ["emial"]}, "key_fields", "did you mean 'email'?"),
        ({"serializer": "no.such.module:x"}, "serializer", "cannot import"),
    ],
)
def test_invalid_declcache_models_override_names_the_variable_entry(
    base: type[DeclarativeBase],
    monkeypatch: pytest.MonkeyPatch,
    override: dict[str, Any],
    attribute: str,
    expected: str,
) -> None:
    monkeypatch.setenv("DECLCACHE_MODELS", json.dumps({"users": override}))
    user = make_user(base, ttl=300)

    with pytest.raises(SettingsError) as excinfo:  # at start-up or, at the latest, here
        CacheManager(CacheConfig.from_env()).spec(user)

    assert excinfo.value.setting == f"DECLCACHE_MODELS[users].{attribute}"
    assert str(excinfo.value).startswith(f"DECLCACHE_MODELS[users].{attribute}: ")
    assert expected in str(excinfo.value)


def test_invalid_explicit_models_override_names_the_argument(
    base: type[DeclarativeBase],
) -> None:
    user = make_user(base, ttl=300)

    with pytest.raises(SettingsError, match=r"^CacheConfig\.models\[User\]\.ttl: "):
        CacheManager(CacheConfig(models={"User": {"ttl": 0}})).spec(user)


def test_invalid_default_serializer_names_the_variable(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECLCACHE_SERIALIZER", "yaml")
    user = make_user(base, ttl=300)

    with pytest.raises(SettingsError, match=r"^DECLCACHE_SERIALIZER: unknown serializer 'yaml'"):
        CacheManager(CacheConfig.from_env()).spec(user)


# -- PickleType ------------------------------------------------------------------------------


def make_thing(base: type[DeclarativeBase], *, deferred: bool = False, **cache_meta: Any) -> type:
    """``Thing(id, payload)``: a PickleType attribute over the column ``data``."""
    namespace: dict[str, Any] = {
        "__tablename__": "things",
        "id": mapped_column(Integer, primary_key=True),
        "payload": mapped_column("data", PickleType, deferred=deferred),
        "CacheMeta": type("CacheMeta", (), cache_meta),
    }
    return type("Thing", (base,), namespace)


@pytest.mark.parametrize("cache_meta", [{}, {"allow_pickle": False}, {"enabled": False}])
def test_a_pickled_column_is_refused_naming_model_attribute_and_column(
    base: type[DeclarativeBase], cache_meta: dict[str, Any]
) -> None:
    thing = make_thing(base, **cache_meta)

    with pytest.raises(CacheMetaError) as excinfo:
        configure_mappers()

    assert (excinfo.value.model, excinfo.value.attribute) == (thing.__name__, "allow_pickle")
    message = str(excinfo.value)
    assert message.startswith("Thing.CacheMeta.allow_pickle: Thing.payload (column things.data)")
    assert "a process that can write the cache could run code in yours" in message


def test_allow_pickle_opts_in(base: type[DeclarativeBase]) -> None:
    thing = make_thing(base, allow_pickle=True)

    spec = spec_of(thing)

    assert spec.allow_pickle
    assert origin(spec.sources["allow_pickle"]) == "CacheMeta"
    assert CacheManager().is_cached(thing)


def test_a_deferred_pickled_column_is_not_cached_so_needs_no_opt_in(
    base: type[DeclarativeBase],
) -> None:
    thing = make_thing(base, deferred=True)

    assert not spec_of(thing).allow_pickle
    assert CacheManager().is_cached(thing)


def test_an_override_turning_allow_pickle_off_refuses_the_model_at_start_up(
    base: type[DeclarativeBase], monkeypatch: pytest.MonkeyPatch
) -> None:
    thing = make_thing(base, allow_pickle=True)
    configure_mappers()
    monkeypatch.setenv("DECLCACHE_MODELS", json.dumps({"things": {"allow_pickle": False}}))

    with pytest.raises(SettingsError) as excinfo:
        CacheManager(CacheConfig.from_env())

    assert excinfo.value.setting == "DECLCACHE_MODELS[things].allow_pickle"
    assert "Thing.payload (column things.data)" in str(excinfo.value)
    assert "set enabled to false as well" in str(excinfo.value)
    monkeypatch.setenv(
        "DECLCACHE_MODELS", json.dumps({"things": {"allow_pickle": False, "enabled": False}})
    )
    assert not CacheManager(CacheConfig.from_env()).is_cached(thing)


# -- one table of options --------------------------------------------------------------------


def test_the_spec_has_every_option_with_its_source_in_table_order(
    base: type[DeclarativeBase],
) -> None:
    spec = spec_of(make_user(base, ttl=5))

    assert list(spec.sources) == [option.name for option in OPTIONS]
    for option in OPTIONS:
        assert hasattr(spec, option.name), option.name
        assert option.description, option.name


def test_defaults_are_the_tables_or_the_setting_it_names(base: type[DeclarativeBase]) -> None:
    config = CacheConfig(expiration_time=77, serializer="msgpack")

    spec = spec_of(make_user(base, __doc__="Cached with every default."), config)

    constants = {o.name: o.default for o in OPTIONS if not isinstance(o.default, FromSetting)}
    settings = {o.name: o.default.field for o in OPTIONS if isinstance(o.default, FromSetting)}
    assert constants == {
        "enabled": True,
        "key_fields": (),
        "cache_not_found": False,
        "cached_relationships": (),
        "allow_pickle": False,
    }
    assert settings == {"ttl": "expiration_time", "serializer": "serializer"}
    assert (spec.enabled, spec.key_fields, spec.cache_not_found) == (True, (("id",),), False)
    assert (spec.ttl, spec.serializer) == (77, "msgpack")
    assert spec.sources == {
        "ttl": "CacheConfig(expiration_time=...)",
        "enabled": "default",
        "serializer": "CacheConfig(serializer=...)",
        "key_fields": "default",
        "cache_not_found": "default",
        "cached_relationships": "default",
        "allow_pickle": "default",
    }


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_every_option_is_checked_in_cache_meta_and_in_overrides(
    base: type[DeclarativeBase], option: _meta.Option
) -> None:
    invalid = object()

    assert check_override(option.name, invalid) is not None
    with pytest.raises(SettingsError) as settings_error:
        CacheConfig(models={"users": {option.name: invalid}})
    assert settings_error.value.setting == f"CacheConfig.models[users].{option.name}"
    user = make_user(base, **{option.name: invalid})
    with pytest.raises(CacheMetaError) as meta_error:
        configure_mappers()
    assert (meta_error.value.model, meta_error.value.attribute) == (user.__name__, option.name)


def test_override_key_fields_of_a_wrong_shape_fail_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECLCACHE_MODELS", '{"users": {"key_fields": [5]}}')

    with pytest.raises(SettingsError) as excinfo:
        CacheConfig.from_env()

    assert excinfo.value.setting == "DECLCACHE_MODELS[users].key_fields"
    assert "expected column attribute names, got 5" in str(excinfo.value)


def test_override_key_fields_columns_are_checked_once_the_model_is_known() -> None:
    assert check_override("key_fields", ["no_such_column"]) is None
    assert check_override("key_fields", [["org", "slug"], "email"]) is not None


def test_meta_does_not_import_the_settings() -> None:
    tree = ast.parse(Path(_meta.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }

    assert "declcache.settings" not in imported
