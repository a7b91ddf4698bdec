"""A small shop that uses declcache: models with CacheMeta and a read-heavy workload."""
