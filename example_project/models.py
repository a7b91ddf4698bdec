"""The example's models: a timestamp mixin, a natural key, and a model kept out of the cache."""

from __future__ import annotations

import datetime as dt
import decimal

from sqlalchemy import DateTime, ForeignKey, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class CachedTimestamps:
    """Mixin: every model using it is cached for five minutes unless it says otherwise."""

    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: dt.datetime.now(dt.UTC).replace(microsecond=0)
    )

    class CacheMeta:
        ttl = 300


class Customer(CachedTimestamps, Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(100))

    class CacheMeta(CachedTimestamps.CacheMeta):
        key_fields = ("email",)  # get_one_or_none(email=...) is served from the cache too


class Product(CachedTimestamps, Base):
    __tablename__ = "products"

    sku: Mapped[str] = mapped_column(String(32), primary_key=True)  # a natural key
    title: Mapped[str] = mapped_column(String(200))
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(10, 2))


class AuditEntry(Base):
    __tablename__ = "audit_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    message: Mapped[str] = mapped_column(String(500))

    class CacheMeta:
        enabled = False  # written constantly, read rarely: not worth caching
