"""Stock repositories that read through the cache: one for ``Session``, one for ``AsyncSession``.

::

    class UserRepository(SQLAlchemyAsyncRepository[User]):
        model_type = User

    user = await UserRepository(session=session).get(1)
"""

from declcache.repository._async import SQLAlchemyAsyncRepository
from declcache.repository._sync import SQLAlchemySyncRepository

__all__ = ["SQLAlchemyAsyncRepository", "SQLAlchemySyncRepository"]
