"""Fixtures local to the fault-injection suite (helpers live in ``fault_helpers``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fault_helpers import Records


@pytest.fixture
def records() -> Iterator[Records]:
    """The ``workflow_manager`` logger's records during the test."""
    handler = Records()
    log = logging.getLogger("workflow_manager")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
