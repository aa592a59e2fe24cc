"""``python -m benchmarks``: see ``benchmarks/__init__.py``."""

from ._cli import main

raise SystemExit(main())
