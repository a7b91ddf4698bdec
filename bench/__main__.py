"""``python -m bench``: run the benchmark suite and print the table (``--help`` for options)."""

import sys

from bench.suite import main

sys.exit(main())
