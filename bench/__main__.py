"""``python -m bench``: run the benchmark suite and print the table (``--help`` for options).

``python -m bench lockstep`` (or ``cold``) runs the lock-step comparison of issue 17 and
``python -m bench scale`` the scale curves; each has its own ``--help``.
"""

import sys

from bench.suite import main

COMMANDS = {"lockstep": "bench._lockstep", "cold": "bench._lockstep", "scale": "bench._scale"}

if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
    import importlib

    sys.exit(importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:]))
sys.exit(main())
