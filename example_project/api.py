"""The shop's web API: Litestar handlers on the stock async repositories, read through the cache.

``python -m example_project serve`` starts it; ``create_app()`` builds it (tests use it with
Litestar's test client). Sessions come from :class:`declcache.integrations.litestar.
DeclCachePlugin`: committed when a handler returns, so a ``PATCH`` has invalidated the cache by
the time its response arrives.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from litestar import Litestar, get, patch
from litestar.exceptions import NotFoundException
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from declcache import CacheConfig, CacheManager
from declcache.config import SQLAlchemyAsyncConfig
from declcache.integrations.litestar import DeclCachePlugin
from declcache.repository import SQLAlchemyAsyncRepository
from example_project.models import Base, Customer, Product
from example_project.settings import async_url, load_settings


class CustomerRepository(SQLAlchemyAsyncRepository[Customer]):
    model_type = Customer


class ProductRepository(SQLAlchemyAsyncRepository[Product]):
    model_type = Product


def _customer(customer: Customer) -> dict[str, Any]:
    return {
        "id": customer.id,
        "email": customer.email,
        "name": customer.name,
        "created_at": customer.created_at.isoformat(),
    }


def _product(product: Product) -> dict[str, Any]:
    return {"sku": product.sku, "title": product.title, "price": str(product.price)}


@get("/customers/{customer_id:int}")
async def get_customer(db_session: AsyncSession, customer_id: int) -> dict[str, Any]:
    """One customer, from the cache when it holds it (NotFoundError becomes a 404)."""
    return _customer(await CustomerRepository(session=db_session).get(customer_id))


@get("/customers")
async def find_customer(db_session: AsyncSession, email: str) -> dict[str, Any]:
    """A customer by email: a ``key_fields`` key, so cached as well."""
    customer = await CustomerRepository(session=db_session).get_one_or_none(email=email)
    if customer is None:
        raise NotFoundException(f"no customer with email {email!r}")
    return _customer(customer)


@patch("/customers/{customer_id:int}")
async def rename_customer(
    db_session: AsyncSession, customer_id: int, data: dict[str, str]
) -> dict[str, Any]:
    """Rename a customer; the plugin commits, and the commit invalidates the cached entry."""
    repository = CustomerRepository(session=db_session)
    customer = await repository.get(customer_id)
    customer.name = data["name"]
    return _customer(await repository.update(customer))


@get("/products/{sku:str}")
async def get_product(db_session: AsyncSession, sku: str) -> dict[str, Any]:
    """One product by its natural key."""
    return _product(await ProductRepository(session=db_session).get(sku))


@get("/products")
async def list_products(db_session: AsyncSession, limit: int = 20) -> list[dict[str, Any]]:
    """The first products by SKU: a cached list, dropped whenever a product changes."""
    products = await ProductRepository(session=db_session).list(order_by=Product.sku, limit=limit)
    return [_product(product) for product in products]


@get("/stats")
async def cache_stats(cache_manager: CacheManager | None) -> dict[str, dict[str, int]]:
    """This process's cache counters per model (what ``declcache stats`` prints)."""
    if cache_manager is None:
        return {}
    return {name: stats.as_dict() for name, stats in cache_manager.stats().items()}


async def _seed(db: SQLAlchemyAsyncConfig, customers: int, products: int) -> None:
    """Create the tables and, when they are empty, add the demo rows."""
    await db.create_all(Base.metadata)
    async with db.get_session() as session:
        if await session.scalar(select(func.count()).select_from(Customer)):
            return
        session.add_all(
            Customer(id=i, email=f"customer{i}@example.com", name=f"Customer {i}")
            for i in range(1, customers + 1)
        )
        session.add_all(
            Product(sku=f"SKU-{i:05d}", title=f"Product {i}", price=i / 4)
            for i in range(1, products + 1)
        )
        await session.commit()


def create_app(database_url: str | None = None, *, seed: bool = True) -> Litestar:
    """The API on ``database_url`` (default: ``EXAMPLE_DATABASE_URL``, else a temp SQLite)."""
    settings = load_settings()
    url = database_url or settings.database_url
    if not url:
        url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='declcache-shop-')) / 'shop.db'}"
    db = SQLAlchemyAsyncConfig(
        connection_string=async_url(url), cache_config=CacheConfig.from_env()
    )

    async def on_startup() -> None:
        if seed:
            await _seed(db, settings.customers, settings.products)

    return Litestar(
        route_handlers=[
            get_customer,
            find_customer,
            rename_customer,
            get_product,
            list_products,
            cache_stats,
        ],
        plugins=[DeclCachePlugin(config=db)],
        on_startup=[on_startup],
    )
