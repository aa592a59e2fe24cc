"""``WorkflowConfiguration``: the spec's settings, validated, from defaults, a file and the env.

Precedence: ``WORKFLOW_*`` environment variables beat the JSON file, which beats the
defaults. Every value is checked where it enters; a bad one stops with one message naming
the field, where the value came from, and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigurationError

__all__ = ["BreakerSettings", "WorkflowConfiguration", "load_configuration"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("detailed", "json")
FORGES = ("auto", "local", "github")
DURABILITY_MODES = ("strict", "overlapped")


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """How many consecutive failures open a breaker, and how long it stays open."""

    failure_threshold: int
    recovery_timeout: float

    def __post_init__(self) -> None:
        if not isinstance(self.failure_threshold, int) or self.failure_threshold < 1:
            raise ValueError("failure_threshold must be a whole number >= 1")
        if not _is_number(self.recovery_timeout) or self.recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be a number of seconds > 0")


def _default_breakers() -> dict[str, BreakerSettings]:
    # The spec's defaults: GitHub 3 failures / 5 minutes, implementation 5 / 10, system 2 / 2.
    return {
        "github": BreakerSettings(3, 300.0),
        "implementation": BreakerSettings(5, 600.0),
        "system": BreakerSettings(2, 120.0),
    }


@dataclass(frozen=True)
class WorkflowConfiguration:
    """Every setting of the runtime. Construct it directly or with ``load_configuration``."""

    # Core reliability features
    enable_monitoring: bool = True
    enable_health_checks: bool = True
    enable_recovery: bool = True
    enable_persistence: bool = True
    # Error handling
    max_retries: int = 3
    timeout_multiplier: float = 1.5
    retry_base_delay: float = 1.0
    retry_max_delay: float = 60.0
    retry_budget_seconds: float = 900.0
    # Logging
    log_level: str = "INFO"
    log_format: str = "detailed"
    # Performance
    checkpoint_frequency: int = 5
    health_check_interval: float = 300.0
    # "strict": a stage's completion is durable before the next stage starts.
    # "overlapped": the next stage starts while it is written; a crash in that window
    # (one group commit, about a millisecond) re-runs the stage on resume.
    durability: str = "strict"
    # GC thresholds and thread switch interval while a runtime is open (_tuning.py)
    tune_interpreter: bool = True
    # Storage, relative to the project root unless absolute
    state_directory: str = ".github/workflow-states"
    checkpoint_directory: str = ".github/workflow-checkpoints"
    log_directory: str = ".github/workflow-logs"
    performance_baselines: Mapping[str, float] = field(default_factory=dict)
    recovery_strategies: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    circuit_breakers: Mapping[str, BreakerSettings] = field(default_factory=_default_breakers)
    # The development workflow
    forge: str = "auto"
    github_repository: str = ""
    github_api_url: str = "https://api.github.com"
    github_token: str = field(default="", repr=False)
    agent_command: str = "claude -p {prompt_file}"
    test_command: str = "{python} -m pytest -q"
    docs_command: str = ""
    reviewers: tuple[str, ...] = ()
    base_branch: str = "main"
    concurrency: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(f.name, getattr(self, f.name), "argument")

    @property
    def resolved_forge(self) -> str:
        """``local`` or ``github``: ``auto`` means GitHub only when a token is set."""
        if self.forge != "auto":
            return self.forge
        return "github" if self.github_token and self.github_repository else "local"

    def redacted(self) -> dict[str, Any]:
        """The settings as a plain dict with every secret replaced, for logs and bundles."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["github_token"] = "***" if self.github_token else ""
        data["circuit_breakers"] = {k: dataclasses.asdict(v)
                                    for k, v in self.circuit_breakers.items()}
        data["performance_baselines"] = dict(self.performance_baselines)
        data["recovery_strategies"] = {k: list(v) for k, v in self.recovery_strategies.items()}
        data["reviewers"] = list(self.reviewers)
        return data

    def replace(self, **changes: Any) -> WorkflowConfiguration:
        return dataclasses.replace(self, **changes)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def _fail(name: str, value: object, source: str, accepted: str) -> ConfigurationError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigurationError(f"invalid {name} = {shown} (from {source}): expected {accepted}")


_BOOLS = {"enable_monitoring", "enable_health_checks", "enable_recovery", "enable_persistence",
          "tune_interpreter"}
_POSITIVE_NUMBERS = {"timeout_multiplier", "health_check_interval", "retry_max_delay",
                     "retry_budget_seconds"}
_STRINGS = {"state_directory", "checkpoint_directory", "log_directory", "github_repository",
            "github_api_url", "github_token", "agent_command", "test_command", "docs_command",
            "base_branch"}


def _check_field(name: str, value: object, source: str) -> None:
    if name in _BOOLS and not isinstance(value, bool):
        raise _fail(name, value, source, "true or false")
    if name in _POSITIVE_NUMBERS and (not _is_number(value) or value <= 0):  # type: ignore[operator]
        raise _fail(name, value, source, "a finite number > 0")
    if name == "retry_base_delay" and (not _is_number(value) or value < 0):  # type: ignore[operator]
        raise _fail(name, value, source, "a finite number >= 0")
    if name == "max_retries" and (type(value) is not int or not 0 <= value <= 100):
        raise _fail(name, value, source, "a whole number from 0 to 100")
    if name in ("checkpoint_frequency", "concurrency") and (
            type(value) is not int or not 1 <= value <= 100_000):
        raise _fail(name, value, source, "a whole number >= 1")
    if name == "log_level" and value not in LOG_LEVELS:
        raise _fail(name, value, source, "one of " + ", ".join(LOG_LEVELS))
    if name == "log_format" and value not in LOG_FORMATS:
        raise _fail(name, value, source, "one of " + ", ".join(LOG_FORMATS))
    if name == "forge" and value not in FORGES:
        raise _fail(name, value, source, "one of " + ", ".join(FORGES))
    if name == "durability" and value not in DURABILITY_MODES:
        raise _fail(name, value, source, "one of " + ", ".join(DURABILITY_MODES))
    if name in _STRINGS and not isinstance(value, str):
        raise _fail(name, value, source, "a string")
    if name in ("state_directory", "checkpoint_directory", "log_directory") and not value:
        raise _fail(name, value, source, "a non-empty directory path")
    if name == "github_repository" and value and (
            not isinstance(value, str) or value.count("/") != 1 or value.startswith("/")
            or value.endswith("/")):
        raise _fail(name, value, source, "owner/name")
    if name == "reviewers" and not (isinstance(value, tuple) and all(
            isinstance(r, str) and r for r in value)):
        raise _fail(name, value, source, "a list of GitHub user names")
    if name == "performance_baselines":
        _check_baselines(value, source)
    if name == "recovery_strategies":
        _check_strategies(value, source)
    if name == "circuit_breakers" and not (isinstance(value, Mapping) and all(
            isinstance(v, BreakerSettings) for v in value.values())):
        raise _fail(name, value, source, "a mapping of name to BreakerSettings")


def _check_baselines(value: object, source: str) -> None:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and _is_number(v) and v > 0 for k, v in value.items()):
        raise _fail("performance_baselines", value, source,
                    "an object mapping stage names to seconds > 0")


def _check_strategies(value: object, source: str) -> None:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, tuple) and all(isinstance(a, str) for a in v)
            for k, v in value.items()):
        raise _fail("recovery_strategies", value, source,
                    "an object mapping names to lists of action names")


_FIELD_TYPES = {f.name: f for f in dataclasses.fields(WorkflowConfiguration)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a JSON or environment value into the field's Python type, or fail clearly."""
    if name not in _FIELD_TYPES:
        accepted = ", ".join(sorted(_FIELD_TYPES))
        raise ConfigurationError(f"unknown setting {name!r} (from {source}); known: {accepted}")
    if name == "reviewers":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(value) if isinstance(value, list) else value
    if name == "recovery_strategies" and isinstance(value, Mapping):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if name == "circuit_breakers":
        return _coerce_breakers(value, source)
    return value


def _coerce_breakers(value: Any, source: str) -> dict[str, BreakerSettings]:
    if not isinstance(value, Mapping):
        raise _fail("circuit_breakers", value, source,
                    'an object like {"github": {"failure_threshold": 3, "recovery_timeout": 300}}')
    merged = _default_breakers()
    for key, settings in value.items():
        try:
            merged[key] = BreakerSettings(**settings)
        except (TypeError, ValueError) as error:
            raise _fail(f"circuit_breakers.{key}", settings, source,
                        f"failure_threshold (>= 1) and recovery_timeout (> 0): {error}") from None
    return merged


def _parse_env(name: str, raw: str, source: str) -> Any:
    f = _FIELD_TYPES[name]
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise _fail(name, raw, source, "true or false")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise _fail(name, raw, source, "a whole number") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise _fail(name, raw, source, "a number") from None
    if name in ("performance_baselines", "recovery_strategies", "circuit_breakers"):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise _fail(name, raw, source, "a JSON object") from None
    return raw


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"configuration file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read configuration file {path}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigurationError(
            f"configuration file {path} is not valid JSON: {error.msg} at line {error.lineno},"
            f" column {error.colno}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"configuration file {path} must hold a JSON object")
    return data


def load_configuration(path: str | os.PathLike[str] | None = None, *,
                       environ: Mapping[str, str] | None = None,
                       **overrides: Any) -> WorkflowConfiguration:
    """Defaults, then the JSON file at ``path``, then ``WORKFLOW_*`` variables, then overrides.

    ``GITHUB_TOKEN`` supplies the token. Raises ConfigurationError naming the bad field.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        for name, value in _read_file(Path(path)).items():
            source = f"configuration file {path}"
            values[name] = _coerce(name, value, source)
            sources[name] = source
    for key, raw in env.items():
        if not key.startswith("WORKFLOW_"):
            continue
        name = key.removeprefix("WORKFLOW_").lower()
        if name not in _FIELD_TYPES:
            continue  # other tools share the prefix; only our own names are read
        source = f"environment variable {key}"
        values[name] = _coerce(name, _parse_env(name, raw, source), source)
        sources[name] = source
    if "github_token" not in values and env.get("GITHUB_TOKEN"):
        values["github_token"] = env["GITHUB_TOKEN"]
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value, "command-line option")
            sources[name] = "command-line option"
    for name, value in values.items():
        _check_field(name, value, sources.get(name, "environment variable GITHUB_TOKEN"))
    return WorkflowConfiguration(**values)
