"""One backend suite (``_suite.py``), subclassed by one test module per backend."""
