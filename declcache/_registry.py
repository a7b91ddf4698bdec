"""Which mapped classes are cached, and whether a configuration fits them: mapper events.

Reading happens in the ``mapper_configured`` event, so a bad CacheMeta fails
``configure_mappers()`` (or the first query) with a :class:`~declcache.exceptions.CacheMetaError`
instead of surfacing at the first cache access. A class whose mapper was configured before
declcache was imported is read on first use instead.

The per-model overrides of a configuration (``DECLCACHE_MODELS``) can only be checked against
a model: whether ``key_fields = ["email"]`` names a unique column depends on the table. A
manager hands its configuration to :func:`watch`, which resolves every model's settings under
it at once for the mappers configured so far, and again in ``mapper_configured`` for every
mapper configured later. So an override that cannot work fails where a bad CacheMeta fails —
at start-up, naming the variable and the model — and never later inside a flush. An override
naming no mapped class or table is logged with a did-you-mean once the mappers are configured
(a model imported later may still match it, so it is not an error).
"""

from __future__ import annotations

import difflib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event, inspect
from sqlalchemy.orm import Mapper, configure_mappers

from declcache._meta import DeclaredMeta, read_cache_meta, resolve_spec
from declcache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy import ForeignKeyConstraint
    from sqlalchemy.orm import RelationshipProperty
    from sqlalchemy.sql.selectable import TableClause

    from declcache._meta import SpecSettings

__all__ = [
    "cached_models",
    "cascading_tables",
    "declared_meta",
    "ensure_configured",
    "mapped_relationships",
    "models_of_table",
    "unmatched_overrides",
    "watch",
]

logger = logging.getLogger("declcache.registry")

_NOT_CACHED = DeclaredMeta({}, {})  # marker: the class was read and has no CacheMeta
_declared: weakref.WeakKeyDictionary[type, DeclaredMeta] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_NAMES_SHOWN = 12  # class and table names a message lists when it has no did-you-mean


@dataclass
class _Watch:
    """A configuration checked against every mapper configured from now on.

    Held weakly: a configuration nothing uses any more is not checked any more.
    """

    config: weakref.ref[SpecSettings]
    reported: set[str] = field(default_factory=set)  # override names already logged as unmatched


# Keyed by ``id(config)``: a CacheConfig holds mappings, so it is not hashable.
_watches: dict[int, _Watch] = {}


@event.listens_for(Mapper, "mapper_configured")
def _read_on_configure(mapper: Mapper[Any], _class: type) -> None:
    declared = _remember(mapper)
    for key, watched in list(_watches.items()):
        config = watched.config()
        if config is None:
            continue
        try:
            _check(config, mapper, declared)
        except ConfigurationError:
            _watches.pop(key, None)  # reported once, here; a later configure is not its business
            raise


@event.listens_for(Mapper, "after_configured")
def _report_on_configure() -> None:
    names = _known_names(_configured_mappers())
    for watched in list(_watches.values()):
        config = watched.config()
        if config is not None:
            _report_unmatched(config, names, watched.reported)


def _remember(mapper: Mapper[Any]) -> DeclaredMeta:
    declared = read_cache_meta(mapper) or _NOT_CACHED
    if declared is not _NOT_CACHED:
        from declcache._associations import install  # noqa: PLC0415 - it reads the registry

        install(mapper)
    with _lock:
        _declared[mapper.class_] = declared
    return declared


def _check(config: SpecSettings, mapper: Mapper[Any], declared: DeclaredMeta) -> None:
    """Resolve ``mapper``'s settings under ``config`` as the manager will, to fail now.

    Only a model with a CacheMeta is ever resolved; overrides of other models have no effect.

    Raises:
        SettingsError: an override of the model cannot work for it (the message names the
            variable and the model).
    """
    if declared is not _NOT_CACHED:
        resolve_spec(mapper, declared, config)


def _configured_mappers() -> list[tuple[Mapper[Any], DeclaredMeta]]:
    """Every mapper read so far whose registry is still in use, with its CacheMeta."""
    with _lock:
        read = list(_declared.items())
    found: list[tuple[Mapper[Any], DeclaredMeta]] = []
    for cls, declared in read:
        mapper: Any = inspect(cls, raiseerr=False)
        if isinstance(mapper, Mapper):  # ``None`` once its registry was disposed
            found.append((mapper, declared))
    return found


def _known_names(mappers: Iterable[tuple[Mapper[Any], DeclaredMeta]]) -> set[str]:
    names: set[str] = set()
    for mapper, _declared_meta in mappers:
        names.add(mapper.class_.__name__)
        table = getattr(mapper.local_table, "name", None)
        if table:
            names.add(table)
    return names


def unmatched_overrides(config: SpecSettings, names: Iterable[str]) -> dict[str, str]:
    """For each per-model override naming none of ``names``, why: with a did-you-mean.

    Args:
        config: the configuration whose ``models`` are checked.
        names: the class and table names the overrides may name.

    Returns:
        override name → a message naming the variable, e.g.
        ``DECLCACHE_MODELS[prodcts] names no model; did you mean 'products'?``.
    """
    known = sorted(set(names))
    problems: dict[str, str] = {}
    for name in config.models:
        if name in known:
            continue
        hint = difflib.get_close_matches(name, known, n=1)
        if hint:
            why = f"did you mean {hint[0]!r}?"
        else:
            shown = known[:_NAMES_SHOWN] + (["…"] if len(known) > _NAMES_SHOWN else [])
            why = f"class or table names: {', '.join(shown) or 'none'}"
        problems[name] = (
            f"{config.setting_name('models')}[{name}] names no model configured so far, so it "
            f"overrides nothing ({why})"
        )
    return problems


def _report_unmatched(config: SpecSettings, names: set[str], reported: set[str]) -> None:
    for name, problem in unmatched_overrides(config, names).items():
        if name not in reported:
            reported.add(name)
            logger.warning("%s", problem)


def watch(config: SpecSettings) -> None:
    """Check ``config``'s per-model overrides against every model, now and as mappers configure.

    The models configured so far are resolved at once; the ones configured later are
    resolved in their ``mapper_configured`` event, so ``configure_mappers()`` (or the first
    query) fails as it does for a bad CacheMeta. A :class:`~declcache.CacheManager` calls it
    when it is built; calling it again with the same configuration is harmless.

    Raises:
        SettingsError: an override cannot work for a model that is already configured; the
            message names the variable (``DECLCACHE_MODELS[users].key_fields``) and the model.
    """
    configured = _configured_mappers()
    for mapper, declared in configured:
        _check(config, mapper, declared)
    key = id(config)
    with _lock:
        watched = _watches.get(key)
        if watched is None or watched.config() is not config:
            watched = _watches[key] = _Watch(weakref.ref(config, lambda _ref: _forget(key)))
    if configured:
        _report_unmatched(config, _known_names(configured), watched.reported)


def _forget(key: int) -> None:
    # No lock: this runs when a configuration is collected, maybe while this thread holds it.
    _watches.pop(key, None)


def declared_meta(model: type) -> DeclaredMeta | None:
    """The validated CacheMeta of ``model``, or ``None`` when the model is not cached.

    Configures mappers first if they are not yet, as a query would.

    Raises:
        CacheMetaError: the model's CacheMeta is invalid.
        sqlalchemy.exc.NoInspectionAvailable: ``model`` is not mapped.
    """
    declared = _declared.get(model)
    if declared is None:
        mapper: Mapper[Any] = inspect(model)
        if not mapper.configured:
            configure_mappers()
        declared = _declared.get(model) or _remember(mapper)
    return None if declared is _NOT_CACHED else declared


def ensure_configured() -> None:
    """Configure every mapper not configured yet, as SQLAlchemy's first query would.

    The registry learns a model in its ``mapper_configured`` event: in a fresh process
    where nothing was queried yet, ``clear()`` or a Core statement through a session would
    otherwise see no model at all. Cheap when nothing is new.
    """
    configure_mappers()


def cached_models() -> list[type]:
    """Every mapped class that declares a CacheMeta, sorted by name; mappers configured first."""
    ensure_configured()
    with _lock:
        models = [cls for cls, declared in _declared.items() if declared is not _NOT_CACHED]
    mapped = [cls for cls in models if inspect(cls, raiseerr=False) is not None]  # not disposed
    return sorted(mapped, key=lambda cls: (cls.__module__, cls.__qualname__))


#: Referential actions by which the database rewrites rows the ORM did not write.
_REWRITING_ACTIONS = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})


def models_of_table(table: object) -> list[type]:
    """Every mapped class (cached or not) whose mapper writes ``table``; mappers configured.

    Core statements name tables, not classes: this is how a ``table.update()`` or a legacy
    bulk call executed through a session finds the models it changes.
    """
    ensure_configured()
    with _lock:
        read = list(_declared)
    found = []
    for cls in read:
        mapper: Any = inspect(cls, raiseerr=False)
        if isinstance(mapper, Mapper) and table in mapper.tables:
            found.append(cls)
    return found


def mapped_relationships() -> list[RelationshipProperty[Any]]:
    """Every relationship of every mapped class (cached or not); mappers configured."""
    ensure_configured()
    with _lock:
        read = list(_declared)
    found: list[RelationshipProperty[Any]] = []
    for cls in read:
        mapper: Any = inspect(cls, raiseerr=False)
        if isinstance(mapper, Mapper):
            found.extend(prop for prop in mapper.relationships if prop.parent is mapper)
    return found


def cascading_tables(table: TableClause, *, on: str) -> list[tuple[Table, ForeignKeyConstraint]]:
    """Tables whose rows the database rewrites when a row of ``table`` is deleted or updated.

    Args:
        table: the table a row was deleted from or updated in.
        on: ``"delete"`` or ``"update"``: which referential action to look at.

    Returns:
        ``(dependent table, its foreign key to table)`` for every foreign key of the same
        MetaData with ``ON DELETE``/``ON UPDATE`` ``CASCADE``, ``SET NULL`` or ``SET DEFAULT``
        pointing at ``table``. The ORM never sees those writes: the cache must be told.
    """
    if not isinstance(table, Table):  # a lightweight table(): no foreign keys
        return []
    found = []
    for dependent in table.metadata.tables.values():
        for constraint in dependent.foreign_key_constraints:
            action = constraint.ondelete if on == "delete" else constraint.onupdate
            if constraint.referred_table is table and (action or "").upper() in _REWRITING_ACTIONS:
                found.append((dependent, constraint))
    return found
