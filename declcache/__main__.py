"""``python -m declcache``: the ``declcache`` command line (see :mod:`declcache.cli`)."""

from declcache.cli import main

raise SystemExit(main())
