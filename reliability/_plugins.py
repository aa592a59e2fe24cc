"""Installed workflow packages (``workflow_manager.plugins`` entry points), target resolvers.

The runtime imports no workflow package by name. A package that adds settings (a
``SettingsSection``) or a default target resolver declares an entry point in this group
naming a module whose import registers them; it is imported the first time the runtime
meets something it does not know (a setting name, a path given as a target), and by the
command line at start.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._logging import logger

if TYPE_CHECKING:
    from ._context import DefinitionLike

__all__ = ["PLUGIN_GROUP", "ResolvedTarget", "TargetResolver", "default_target_resolver",
           "load_plugins", "register_target_resolver"]

PLUGIN_GROUP = "workflow_manager.plugins"
_lock = threading.RLock()  # a plugin's import may construct a configuration
_loaded = False


def load_plugins() -> None:
    """Import every installed plugin module, once per process. A plugin that fails to
    import is logged and skipped: it must not stop workflows that do not use it."""
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            try:
                entry.load()
            except Exception as error:
                logger.warning(
                    "Plugin %s (%s) could not be loaded: %s: %s", entry.name, entry.value,
                    type(error).__name__, error)


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """What a target resolver makes of a path: the definition to run, its inputs, and the
    file the workflow was started from (kept in its state, shown by ``list``)."""

    definition: DefinitionLike
    context: dict[str, Any]
    prompt_file: str | None = None


# (target, the caller's context) -> what to run
TargetResolver = Callable[[str | os.PathLike[str], Mapping[str, Any]], ResolvedTarget]
_resolver: TargetResolver | None = None


def register_target_resolver(resolver: TargetResolver | None) -> None:
    """Make ``resolver`` how ``Runtime.run("a/path")`` turns a path into a workflow, for every
    runtime not given one of its own; a workflow package registers its own when imported
    (see the module docstring). None unregisters."""
    global _resolver
    _resolver = resolver


def default_target_resolver() -> TargetResolver | None:
    """The registered resolver; installed plugins are loaded first if there is none."""
    if _resolver is None:
        load_plugins()
    return _resolver
