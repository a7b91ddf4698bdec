"""Seed a database and run a read-heavy workload twice: through the cache and without it."""

from __future__ import annotations

import decimal
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from declcache import CacheConfig, CacheManager, setup_cache_listeners
from example_project.models import Base, Customer, Product
from example_project.settings import load_settings


@dataclass
class RunResult:
    label: str
    reads: int
    queries: int
    latencies_us: list[float]

    @property
    def median_us(self) -> float:
        return statistics.median(self.latencies_us)


def seed(engine: Engine, customers: int, products: int) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            Customer(id=i, email=f"customer{i}@example.com", name=f"Customer {i}")
            for i in range(1, customers + 1)
        )
        session.add_all(
            Product(sku=f"SKU-{i:05d}", title=f"Product {i}", price=decimal.Decimal(i) / 4)
            for i in range(1, products + 1)
        )
        session.commit()


class QueryCounter:
    """Counts statements the engine sends, the way the test suite proves cache hits."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *_args: object) -> None:
        self.count += 1


def run(
    engine: Engine,
    manager: CacheManager,
    *,
    label: str,
    reads: int,
    customers: int,
    seed_value: int = 7,
    progress: Callable[[int], None] = lambda _done: None,
) -> RunResult:
    """Read random customers, each in a fresh session, the way a web request would."""
    counter = QueryCounter(engine)
    rng = random.Random(seed_value)
    hot = max(1, customers // 10)  # 90 % of reads go to 10 % of the customers
    latencies = []
    for done in range(1, reads + 1):
        ident = rng.randint(1, hot) if rng.random() < 0.9 else rng.randint(1, customers)
        start = time.perf_counter()
        with Session(engine, info={"cache_manager": manager}) as session:
            customer = manager.load(Customer, ident, partial(session.get, Customer, ident))
        latencies.append((time.perf_counter() - start) * 1e6)
        if customer is None or customer.id != ident:
            raise RuntimeError(f"customer {ident} read back as {customer!r}")
        progress(done)
    event.remove(engine, "before_cursor_execute", counter._count)
    return RunResult(label, reads, counter.count, latencies)


def demo_manager(reads: int = 1000, customers: int = 200) -> CacheManager:
    """Run a short workload on an in-memory SQLite database and return its manager.

    ``declcache stats example_project.workload:demo_manager`` (or ``--run-example``) prints
    its counters: reads of customers and products, then one committed rename.
    """
    load_settings()  # example_project/.env, under the environment
    manager = CacheManager(CacheConfig.from_env())
    setup_cache_listeners()
    engine = create_engine("sqlite://", poolclass=StaticPool)
    seed(engine, customers=customers, products=20)
    run(engine, manager, label="cached", reads=reads, customers=customers)
    with Session(engine, info={"cache_manager": manager}) as session:
        for number in (1, 2, 3, 1, 2):
            sku = f"SKU-{number:05d}"
            manager.load(Product, sku, partial(session.get, Product, sku))
        customer = manager.load(Customer, 1, partial(session.get, Customer, 1))
        session.merge(customer).name = "Renamed customer"
        session.commit()  # invalidates customer 1 after the commit
    engine.dispose()
    return manager
