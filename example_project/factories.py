"""factory-boy factories of the example's models (tests and ad-hoc data; needs factory-boy).

::

    CustomerFactory.build()                  # an unsaved Customer
    with factories.using(session):
        CustomerFactory.create_batch(10)     # added to the session and flushed
"""

from __future__ import annotations

import contextlib
import decimal
from collections.abc import Iterator

import factory
from sqlalchemy.orm import Session

from example_project.models import AuditEntry, Customer, Product

_sessions: list[Session] = []


@contextlib.contextmanager
def using(session: Session) -> Iterator[Session]:
    """Make the factories' ``create()`` add to ``session`` inside the block."""
    _sessions.append(session)
    try:
        yield session
    finally:
        _sessions.pop()


def _current_session() -> Session:
    if not _sessions:
        raise RuntimeError("create() needs a session: wrap it in `with factories.using(s):`")
    return _sessions[-1]


class _Base(factory.alchemy.SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_factory = _current_session
        sqlalchemy_session_persistence = "flush"


class CustomerFactory(_Base):
    class Meta:
        model = Customer

    id = factory.Sequence(lambda n: n + 1)
    email = factory.Sequence(lambda n: f"customer{n + 1}@example.com")
    name = factory.Faker("name")


class ProductFactory(_Base):
    class Meta:
        model = Product

    sku = factory.Sequence(lambda n: f"SKU-{n + 1:05d}")
    title = factory.Faker("catch_phrase")
    price = factory.LazyFunction(lambda: decimal.Decimal("9.99"))


class AuditEntryFactory(_Base):
    class Meta:
        model = AuditEntry

    customer_id = 1  # pass the customer's: AuditEntryFactory.create(customer_id=c.id, ...)
    message = factory.Faker("sentence")
