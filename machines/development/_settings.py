"""The development workflow's settings: its section of ``WorkflowConfiguration``.

Registered on import under the name ``development``, so ``WorkflowConfiguration(
forge="github", github_repository="o/r")``, the JSON file's ``"reviewers"`` and
``WORKFLOW_AGENT_COMMAND`` keep working as flat settings; handlers read them typed with
``settings_of(ctx.config)``.

The GitHub token: ``github_token`` when given, else ``GITHUB_TOKEN`` read when the GitHub
forge starts. It is never in ``repr``, ``redacted()``, a log line or a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from reliability import (
    BreakerSettings,
    SettingsSection,
    WorkflowConfiguration,
    register_settings_section,
    setting_error,
)

__all__ = ["FORGES", "TOKEN_VARIABLE", "DevelopmentSettings", "settings_of"]

FORGES = ("auto", "local", "github")
TOKEN_VARIABLE = "GITHUB_TOKEN"


@dataclass(frozen=True, slots=True)
class DevelopmentSettings:
    """Where the development workflow files issues and pull requests, and what it runs."""

    forge: str = "auto"
    github_repository: str = ""
    github_api_url: str = "https://api.github.com"
    github_token: str = field(default="", repr=False)
    agent_command: str = "claude -p {prompt_file}"
    test_command: str = "{python} -m pytest -q"
    docs_command: str = ""
    reviewers: tuple[str, ...] = ()
    base_branch: str = "main"
    # How long review_processing waits (parked, holding nothing) for signal "review".
    review_wait_seconds: float = 3 * 24 * 3600.0

    def token(self, environ: Mapping[str, str] | None = None) -> str:
        """The given token, else ``GITHUB_TOKEN`` from the environment (or "")."""
        env = os.environ if environ is None else environ
        return self.github_token or env.get(TOKEN_VARIABLE, "")

    def resolved_forge(self, environ: Mapping[str, str] | None = None) -> str:
        """``local`` or ``github``: ``auto`` means GitHub when a repository and a token are
        there."""
        if self.forge != "auto":
            return self.forge
        return "github" if self.github_repository and self.token(environ) else "local"


def settings_of(config: WorkflowConfiguration) -> DevelopmentSettings:
    """``config``'s development settings, typed."""
    return config.section(DevelopmentSettings)


_STRINGS = {"github_repository", "github_api_url", "github_token", "agent_command",
            "test_command", "docs_command", "base_branch"}


def _check(name: str, value: object, source: str) -> None:
    if name == "forge" and value not in FORGES:
        raise setting_error(name, value, source, "one of " + ", ".join(FORGES))
    if name in _STRINGS and not isinstance(value, str):
        raise setting_error(name, value, source, "a string")
    if name == "github_repository" and value and (
            not isinstance(value, str) or value.count("/") != 1 or value.startswith("/")
            or value.endswith("/")):
        raise setting_error(name, value, source, "owner/name")
    if name == "review_wait_seconds" and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise setting_error(name, value, source, "a number of seconds >= 0")
    if name == "base_branch" and not value:
        raise setting_error(name, value, source, "a branch name")


SECTION = SettingsSection(
    "development", DevelopmentSettings, _check, secrets=frozenset({"github_token"}),
    secret_environment=(TOKEN_VARIABLE,),
    # The spec's defaults: GitHub 3 failures / 5 minutes, implementation 5 / 10.
    breakers={"github": BreakerSettings(3, 300.0),
              "implementation": BreakerSettings(5, 600.0)})
register_settings_section(SECTION)
