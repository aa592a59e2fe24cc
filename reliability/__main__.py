"""``python -m reliability``: the ``workflow-manager`` command line."""

from ._cli import entry

entry()
