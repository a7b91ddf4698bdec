"""Web framework integrations, each behind its own extra.

* :mod:`declcache.integrations.litestar` — ``pip install 'declcache[litestar]'``
* :mod:`declcache.integrations.fastapi` — ``pip install 'declcache[fastapi]'``

Both take a :class:`~declcache.config.SQLAlchemyAsyncConfig` and give every request its own
session carrying the cache manager: committed when the handler returns, rolled back when it
raises (the commit invalidates what the request changed, before the response is sent).
"""
