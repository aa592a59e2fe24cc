"""``python -m reliability``: the ``workflow-manager`` command line."""

from ._cli import main

raise SystemExit(main())
