"""declcache's benchmark suite: ``python -m bench`` (``--quick`` for a short run).

See docs/performance.md for what each row measures and the figures of the last full run.
"""
