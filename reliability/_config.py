"""``WorkflowConfiguration``: the runtime's settings, validated, from defaults, a file and the env.

Precedence: ``WORKFLOW_*`` environment variables beat the JSON file, which beats the
defaults; keyword overrides beat all three. Every value is checked where it enters; a bad
one stops with one message naming the field, where the value came from, and what is
accepted.

Settings sections: a workflow package adds settings of its own by registering a
``SettingsSection``: a frozen dataclass whose fields are the settings, and a checker. Its
fields are then accepted under their own flat names wherever a core setting is
(``WorkflowConfiguration(repository="o/r")``, the JSON file, ``WORKFLOW_REPOSITORY``), read
back as attributes (``config.repository``), typed through
``config.section(TheSettings)``, and listed by ``redacted()``. A name no section registered
is refused, naming where it came from. Packages that declare a ``workflow_manager.plugins``
entry point are imported the first time an unknown name is met, so a configuration file
written for an installed workflow package loads without importing that package first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._errors import ConfigurationError
from ._plugins import load_plugins
from ._postgres._url import is_postgres_url, mask_url, url_passwords

__all__ = ["BreakerSettings", "SettingsSection", "WorkflowConfiguration", "environment_secrets",
           "load_configuration", "register_settings_section", "setting_error"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("detailed", "json")
DURABILITY_MODES = ("strict", "overlapped")
S = TypeVar("S")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """How many consecutive failures open a breaker, and how long it stays open."""

    failure_threshold: int
    recovery_timeout: float

    def __post_init__(self) -> None:
        if type(self.failure_threshold) is not int or self.failure_threshold < 1:
            raise ValueError("failure_threshold must be a whole number >= 1")
        if not _is_number(self.recovery_timeout) or self.recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be a number of seconds > 0")


# A breaker nobody configured: 5 failures open it for a minute.
FALLBACK_BREAKER = BreakerSettings(5, 60.0)


def _default_breakers() -> dict[str, BreakerSettings]:
    return {"system": BreakerSettings(2, 120.0)}


@dataclass(frozen=True, slots=True)
class SettingsSection:
    """Settings a workflow package adds to ``WorkflowConfiguration``.

    ``settings`` is a frozen dataclass whose fields (each with a default) are the settings'
    names; ``check(name, value, source)`` raises ``setting_error(...)`` for a bad value
    (values arrive already converted: a sequence as a tuple, an env string parsed by the
    field default's type). ``secrets`` names fields ``repr`` and ``redacted()`` never show;
    ``secret_environment`` names environment variables whose values diagnostics redact.
    ``breakers`` are the package's default circuit breakers (a configured one wins).
    """

    name: str
    settings: type[Any]
    check: Callable[[str, Any, str], None]
    secrets: frozenset[str] = frozenset()
    secret_environment: tuple[str, ...] = ()
    breakers: Mapping[str, BreakerSettings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.settings):
            raise TypeError(f"settings section {self.name!r}: settings must be a dataclass")
        for f in dataclasses.fields(self.settings):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"settings section {self.name!r}: field {f.name!r} needs a "
                                "default")


_SECTIONS: dict[str, SettingsSection] = {}
_SECTION_OF: dict[str, SettingsSection] = {}  # setting name -> the section that owns it


def register_settings_section(section: SettingsSection) -> None:
    """Make ``section``'s settings known to every ``WorkflowConfiguration`` made after this.

    Registering the same section again (a module re-imported) replaces it; a setting name
    another section or the core already owns is refused.
    """
    names = [f.name for f in dataclasses.fields(section.settings)]
    for name in names:
        owner = "the core" if name in _CORE else getattr(_SECTION_OF.get(name), "name", None)
        if owner is not None and owner != section.name:
            raise ValueError(f"settings section {section.name!r}: setting {name!r} already "
                             f"belongs to {owner}")
    previous = _SECTIONS.get(section.name)
    if previous is not None:
        for f in dataclasses.fields(previous.settings):
            _SECTION_OF.pop(f.name, None)
    _SECTIONS[section.name] = section
    for name in names:
        _SECTION_OF[name] = section


def setting_error(name: str, value: object, source: str, accepted: str) -> ConfigurationError:
    """The one message every refused setting gets: field, value, source, what is accepted."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigurationError(f"invalid {name} = {shown} (from {source}): expected {accepted}")


@dataclass(frozen=True, init=False)
class WorkflowConfiguration:
    """Every setting of the runtime, as keyword arguments: ``WorkflowConfiguration(
    max_retries=5, reviewers=["alice"])``. Or build one with ``load_configuration``.

    Sequences may be any sequence (not a lone string) and are kept as tuples;
    ``circuit_breakers`` takes ``BreakerSettings`` or plain mappings with
    ``failure_threshold`` and ``recovery_timeout``. Settings of registered sections are
    accepted by name and read back as attributes.
    """

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
    # GC thresholds and thread switch interval while a runtime is open (_tuning.py). Off:
    # a library leaves the host interpreter alone unless the application asks; the
    # command line's long-running commands turn it on.
    tune_interpreter: bool = False
    # Storage, relative to the project root unless absolute
    state_directory: str = ".github/workflow-states"
    checkpoint_directory: str = ".github/workflow-checkpoints"
    log_directory: str = ".github/workflow-logs"
    performance_baselines: Mapping[str, float] = field(default_factory=dict)
    recovery_strategies: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    circuit_breakers: Mapping[str, BreakerSettings] = field(default_factory=_default_breakers)
    # Workflows a batch runs at once
    concurrency: int = 8
    # Where workflows live: "" keeps the file store under the project root;
    # "postgresql://..." shares them with worker processes on many hosts. Shown masked.
    store_url: str = ""
    # How long a worker's claims outlive its last heartbeat (PostgreSQL store)
    lease_seconds: float = 30.0
    # Registered sections' settings that differ from their defaults, by section name
    sections: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, **settings: Any) -> None:
        _fill(self, settings, {}, "argument")

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: a section's setting, read by its flat name.
        if name.startswith("_"):
            raise AttributeError(name)
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"WorkflowConfiguration has no setting {name!r}")
        return getattr(self.section(section.settings), name)

    def section(self, settings: type[S]) -> S:
        """The registered section whose dataclass is ``settings``: ``config.section(
        DevelopmentSettings).forge``, typed. Defaults when nothing of it was set."""
        for section in _SECTIONS.values():
            if section.settings is settings:
                stored = self.sections.get(section.name)
                return stored if stored is not None else settings()
        raise ConfigurationError(f"{settings.__name__} is not a registered settings section")

    def breaker_settings(self, name: str) -> BreakerSettings:
        """Breaker ``name``'s settings: configured, else a section's default, else 5 / 60 s."""
        configured = self.circuit_breakers.get(name)
        if configured is not None:
            return configured
        for section in _SECTIONS.values():
            if name in section.breakers:
                return section.breakers[name]
        return FALLBACK_BREAKER

    def secret_values(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Every secret this configuration or its sections know of: secret settings and
        the sections' secret environment variables. For redacting what is shown or saved."""
        found: list[str] = []
        for section in _SECTIONS.values():
            values = self.section(section.settings)
            found.extend(str(getattr(values, name) or "") for name in section.secrets)
        if self.store_url:
            found.extend(url_passwords(self.store_url))
        return [value for value in found if value] + environment_secrets(environ)

    def redacted(self) -> dict[str, Any]:
        """The settings as a plain dict with every secret replaced, for logs and bundles."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _CORE}
        data["store_url"] = mask_url(self.store_url) if self.store_url else ""
        breakers = {name: dataclasses.asdict(settings)
                    for section in _SECTIONS.values()
                    for name, settings in section.breakers.items()}
        breakers.update({k: dataclasses.asdict(v) for k, v in self.circuit_breakers.items()})
        data["circuit_breakers"] = breakers
        data["performance_baselines"] = dict(self.performance_baselines)
        data["recovery_strategies"] = {k: list(v) for k, v in self.recovery_strategies.items()}
        for section in _SECTIONS.values():
            values = self.section(section.settings)
            for f in dataclasses.fields(section.settings):
                value = getattr(values, f.name)
                if f.name in section.secrets:
                    value = "***" if value else ""
                data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> WorkflowConfiguration:
        """A copy with ``changes`` (core or section settings), checked like a new one."""
        values: dict[str, Any] = {name: getattr(self, name) for name in _CORE}
        for stored in self.sections.values():
            values.update({f.name: getattr(stored, f.name)
                           for f in dataclasses.fields(stored)})
        values.update(changes)
        return WorkflowConfiguration(**values)


_CORE = {f.name: f for f in dataclasses.fields(WorkflowConfiguration) if f.name != "sections"}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _fill(config: WorkflowConfiguration, values: Mapping[str, Any], sources: Mapping[str, str],
          default_source: str) -> None:
    """Convert, check and set every value on ``config`` (a frozen dataclass being built)."""
    core: dict[str, Any] = {}
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        source = sources.get(name, default_source)
        section = _section_for(name, source)
        converted = _convert(name, value, source, section)
        if section is None:
            _check_core(name, converted, source)
            core[name] = converted
        else:
            section.check(name, converted, source)
            by_section.setdefault(section.name, {})[name] = converted
    for name, f in _CORE.items():
        object.__setattr__(config, name, core[name] if name in core else _default(f))
    sections: dict[str, Any] = {}
    for section_name, given in by_section.items():
        settings = _SECTIONS[section_name].settings(**given)
        if settings != _SECTIONS[section_name].settings():
            sections[section_name] = settings
    object.__setattr__(config, "sections", sections)


def _section_for(name: str, source: str) -> SettingsSection | None:
    if name in _CORE:
        return None
    if name not in _SECTION_OF:
        load_plugins()  # an installed workflow package may own it
    section = _SECTION_OF.get(name)
    if section is None:
        known = ", ".join(sorted([*_CORE, *_SECTION_OF]))
        raise ConfigurationError(f"unknown setting {name!r} (from {source}); known: {known}")
    return section


def names_tuple(name: str, value: object, source: str, accepted: str) -> tuple[str, ...]:
    """Any sequence of non-empty strings as a tuple; a lone string is refused, not split."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise setting_error(name, value, source, accepted)
    names = tuple(value)
    if not all(isinstance(item, str) and item for item in names):
        raise setting_error(name, value, source, accepted)
    return names


def _convert(name: str, value: Any, source: str,
             section: SettingsSection | None) -> Any:
    """A value given in Python, JSON or the environment, in its stored form."""
    if section is not None:
        default = _default(next(f for f in dataclasses.fields(section.settings)
                                if f.name == name))
        if isinstance(default, tuple):
            return names_tuple(name, value, source, "a list of names")
        return value
    if name == "recovery_strategies":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise setting_error(name, value, source,
                                "a mapping of names to lists of action names")
        return {k: names_tuple(f"recovery_strategies.{k}", v, source, "a list of action names")
                for k, v in value.items()}
    if name == "circuit_breakers":
        return _convert_breakers(value, source)
    if name == "performance_baselines":
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and _is_number(v) and v > 0 for k, v in value.items()):
            raise setting_error(name, value, source, "a mapping of stage names to seconds > 0")
        return dict(value)
    return value


def _convert_breakers(value: Any, source: str) -> dict[str, BreakerSettings]:
    if not isinstance(value, Mapping):
        raise setting_error(
            "circuit_breakers", value, source,
            'a mapping like {"name": {"failure_threshold": 3, "recovery_timeout": 300}}')
    merged = _default_breakers()
    for key, settings in value.items():
        if isinstance(settings, BreakerSettings):
            merged[str(key)] = settings
            continue
        try:
            if not isinstance(settings, Mapping):
                raise TypeError("not a mapping")
            merged[str(key)] = BreakerSettings(**settings)
        except (TypeError, ValueError) as error:
            raise setting_error(f"circuit_breakers.{key}", settings, source,
                                f"failure_threshold (>= 1) and recovery_timeout (> 0): {error}"
                                ) from None
    return merged


_BOOLS = {"enable_monitoring", "enable_health_checks", "enable_recovery", "enable_persistence",
          "tune_interpreter"}
_POSITIVE_NUMBERS = {"timeout_multiplier", "health_check_interval", "retry_max_delay",
                     "retry_budget_seconds", "lease_seconds"}
_DIRECTORIES = {"state_directory", "checkpoint_directory", "log_directory"}


def _check_core(name: str, value: object, source: str) -> None:
    if name in _BOOLS and not isinstance(value, bool):
        raise setting_error(name, value, source, "true or false")
    if name in _POSITIVE_NUMBERS and (not _is_number(value) or value <= 0):  # type: ignore[operator]
        raise setting_error(name, value, source, "a finite number > 0")
    if name == "retry_base_delay" and (not _is_number(value) or value < 0):  # type: ignore[operator]
        raise setting_error(name, value, source, "a finite number >= 0")
    if name == "max_retries" and (type(value) is not int or not 0 <= value <= 100):
        raise setting_error(name, value, source, "a whole number from 0 to 100")
    if name in ("checkpoint_frequency", "concurrency") and (
            type(value) is not int or not 1 <= value <= 100_000):
        raise setting_error(name, value, source, "a whole number >= 1")
    if name == "log_level" and value not in LOG_LEVELS:
        raise setting_error(name, value, source, "one of " + ", ".join(LOG_LEVELS))
    if name == "log_format" and value not in LOG_FORMATS:
        raise setting_error(name, value, source, "one of " + ", ".join(LOG_FORMATS))
    if name == "durability" and value not in DURABILITY_MODES:
        raise setting_error(name, value, source, "one of " + ", ".join(DURABILITY_MODES))
    if name == "store_url" and (not isinstance(value, str) or (
            value and not is_postgres_url(value))):
        shown = mask_url(value) if isinstance(value, str) else value
        raise setting_error(name, shown, source, "empty (the file store) or a "
                            "postgresql://user@host/database URL")
    if name in _DIRECTORIES and not isinstance(value, str):
        raise setting_error(name, value, source, "a string")
    if name in _DIRECTORIES and not value:
        raise setting_error(name, value, source, "a non-empty directory path")


def _parse_env(name: str, raw: str, source: str) -> Any:
    """A ``WORKFLOW_*`` string as the type of the setting's default."""
    section = _SECTION_OF.get(name)
    fields = dataclasses.fields(section.settings) if section is not None else _CORE.values()
    default = _default(next(f for f in fields if f.name == name))
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise setting_error(name, raw, source, "true or false")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise setting_error(name, raw, source, "a whole number") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise setting_error(name, raw, source, "a number") from None
    if isinstance(default, tuple):  # a comma-separated list: "ann, bob"
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if isinstance(default, Mapping):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise setting_error(name, raw, source, "a JSON object") from None
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
                       defaults: Mapping[str, Any] | None = None,
                       **overrides: Any) -> WorkflowConfiguration:
    """Defaults (``defaults`` replacing built-in ones), then the JSON file at ``path``, then
    ``WORKFLOW_*`` variables, then overrides (a None override means "not given"). Raises
    ConfigurationError naming the bad field and where it came from."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = dict(defaults or {})
    sources: dict[str, str] = dict.fromkeys(values, "defaults")
    if path is not None:
        source = f"configuration file {path}"
        for name, value in _read_file(Path(path)).items():
            _section_for(name, source)  # an unknown name is refused here, naming the file
            values[name], sources[name] = value, source
    variables = [(key, key.removeprefix("WORKFLOW_").lower()) for key in env
                 if key.startswith("WORKFLOW_")]
    if any(name not in _CORE and name not in _SECTION_OF for _, name in variables):
        load_plugins()  # WORKFLOW_FORGE may belong to an installed workflow package
    for key, name in variables:
        if name not in _CORE and name not in _SECTION_OF:
            continue  # other tools share the prefix; only our own names are read
        source = f"environment variable {key}"
        values[name], sources[name] = _parse_env(name, env[key], source), source
    for name, value in overrides.items():
        if value is not None:
            values[name], sources[name] = value, "command-line option"
    config = object.__new__(WorkflowConfiguration)
    _fill(config, values, sources, "argument")
    return config


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment variables registered sections call secret."""
    env = os.environ if environ is None else environ
    return [env[variable] for section in _SECTIONS.values()
            for variable in section.secret_environment if env.get(variable)]
