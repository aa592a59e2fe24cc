"""Configuration: the spec's defaults, a JSON file, WORKFLOW_* variables, and clear refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from machines.development import DevelopmentSettings, settings_of
from reliability import (
    BreakerSettings,
    ConfigurationError,
    SettingsSection,
    WorkflowConfiguration,
    load_configuration,
    register_settings_section,
    setting_error,
)


def write_config(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


class TestDefaults:
    def test_defaults_match_the_spec(self) -> None:
        """Every field the spec lists has the spec's default."""
        config = load_configuration(environ={})
        assert (config.enable_monitoring, config.enable_health_checks, config.enable_recovery,
                config.enable_persistence) == (True, True, True, True)
        assert config.max_retries == 3
        assert config.timeout_multiplier == 1.5
        assert config.log_level == "INFO" and config.log_format == "detailed"
        assert config.checkpoint_frequency == 5
        assert config.health_check_interval == 300
        assert config.state_directory == ".github/workflow-states"
        assert config.checkpoint_directory == ".github/workflow-checkpoints"
        assert config.log_directory == ".github/workflow-logs"

    def test_added_fields_have_their_documented_defaults(self) -> None:
        """Forge settings and breakers default as the README's Configuration says."""
        config = WorkflowConfiguration()
        assert config.github_api_url == "https://api.github.com"
        assert config.forge == "auto" and settings_of(config).resolved_forge({}) == "local"
        assert config.breaker_settings("github") == BreakerSettings(3, 300.0)
        assert config.breaker_settings("implementation") == BreakerSettings(5, 600.0)
        assert config.breaker_settings("system") == BreakerSettings(2, 120.0)
        assert config.breaker_settings("anything-else") == BreakerSettings(5, 60.0)

    def test_a_library_leaves_the_interpreter_alone_by_default(self) -> None:
        """tune_interpreter is off unless the application (or the CLI) turns it on."""
        assert WorkflowConfiguration().tune_interpreter is False
        assert load_configuration(environ={}).tune_interpreter is False
        assert load_configuration(environ={}, defaults={"tune_interpreter": True}
                                  ).tune_interpreter is True
        assert load_configuration(environ={"WORKFLOW_TUNE_INTERPRETER": "0"},
                                  defaults={"tune_interpreter": True}).tune_interpreter is False

    def test_loading_with_nothing_set_equals_the_plain_defaults(self) -> None:
        """No file and no variables give exactly WorkflowConfiguration()."""
        assert load_configuration(environ={}) == WorkflowConfiguration()


class TestSources:
    def test_json_file_sets_values(self, tmp_path: Path) -> None:
        """The spec's JSON file shape is read, including nested breaker settings."""
        path = write_config(tmp_path, {
            "enable_monitoring": False, "max_retries": 5, "timeout_multiplier": 2.5,
            "log_level": "DEBUG", "checkpoint_frequency": 1, "reviewers": ["ann", "bob"],
            "recovery_strategies": {"transient_errors": ["wait_for_breakers"]},
            "circuit_breakers": {"github": {"failure_threshold": 7, "recovery_timeout": 30}}})
        config = load_configuration(path, environ={})
        assert config.enable_monitoring is False
        assert (config.max_retries, config.timeout_multiplier) == (5, 2.5)
        assert config.log_level == "DEBUG" and config.checkpoint_frequency == 1
        assert config.reviewers == ("ann", "bob")
        assert config.recovery_strategies == {"transient_errors": ("wait_for_breakers",)}
        assert config.circuit_breakers["github"] == BreakerSettings(7, 30)
        assert config.circuit_breakers["system"] == BreakerSettings(2, 120.0)

    def test_environment_variables_override_defaults(self) -> None:
        """The spec's WORKFLOW_* examples are parsed to the right types."""
        config = load_configuration(environ={
            "WORKFLOW_ENABLE_MONITORING": "false", "WORKFLOW_LOG_LEVEL": "DEBUG",
            "WORKFLOW_MAX_RETRIES": "5", "WORKFLOW_TIMEOUT_MULTIPLIER": "2.0",
            "WORKFLOW_STATE_DIRECTORY": ".custom/states", "WORKFLOW_REVIEWERS": "ann, bob"})
        assert config.enable_monitoring is False and config.log_level == "DEBUG"
        assert config.max_retries == 5 and config.timeout_multiplier == 2.0
        assert config.state_directory == ".custom/states"
        assert config.reviewers == ("ann", "bob")

    def test_environment_beats_file_beats_defaults(self, tmp_path: Path) -> None:
        """A value in both file and env comes from the env; file-only values stay."""
        path = write_config(tmp_path, {"max_retries": 7, "log_level": "ERROR"})
        config = load_configuration(path, environ={"WORKFLOW_MAX_RETRIES": "1"})
        assert config.max_retries == 1
        assert config.log_level == "ERROR"
        assert config.checkpoint_frequency == 5

    def test_keyword_overrides_beat_the_environment(self) -> None:
        """Command-line options (keyword overrides) win over env; None means 'not given'."""
        config = load_configuration(environ={"WORKFLOW_MAX_RETRIES": "1"}, max_retries=9,
                                    log_level=None)
        assert config.max_retries == 9 and config.log_level == "INFO"

    def test_unrelated_workflow_variables_are_ignored(self) -> None:
        """Other tools' WORKFLOW_* variables are not our settings and are not errors."""
        config = load_configuration(environ={"WORKFLOW_RUN_ID": "17"})
        assert config == WorkflowConfiguration()

    def test_github_token_stays_in_the_environment_until_the_forge_needs_it(self) -> None:
        """GITHUB_TOKEN is not copied into the settings; the forge's token() reads it, and
        it is a secret to redact."""
        environ = {"GITHUB_TOKEN": "ghp_secret"}
        config = load_configuration(environ=environ)
        assert config.github_token == ""
        assert settings_of(config).token(environ) == "ghp_secret"
        assert settings_of(config.replace(github_repository="o/r")).resolved_forge(
            environ) == "github"
        assert "ghp_secret" in config.secret_values(environ)
        assert "ghp_secret" not in repr(config) + json.dumps(config.redacted(), default=str)

    def test_a_given_token_is_never_shown(self) -> None:
        """github_token given explicitly: repr() and redacted() hide it; it wins over env."""
        config = WorkflowConfiguration(github_token="ghp_given")
        assert "ghp_given" not in repr(config)
        assert config.redacted()["github_token"] == "***"
        assert "ghp_given" not in json.dumps(config.redacted(), default=str)
        assert settings_of(config).token({"GITHUB_TOKEN": "ghp_env"}) == "ghp_given"
        assert "ghp_given" in config.secret_values({})


class TestOrdinaryPython:
    def test_reviewers_take_a_list_and_are_kept_as_a_tuple(self) -> None:
        """WorkflowConfiguration(reviewers=["alice"]) works; any sequence is a tuple."""
        assert WorkflowConfiguration(reviewers=["alice"]).reviewers == ("alice",)
        assert WorkflowConfiguration(reviewers=("a", "b")).reviewers == ("a", "b")

    def test_a_lone_string_is_not_a_list_of_reviewers(self) -> None:
        """reviewers="alice" is refused clearly instead of becoming ("a", "l", ...)."""
        with pytest.raises(ConfigurationError, match=(
                r"invalid reviewers = 'alice' \(from argument\): expected a list of names")):
            WorkflowConfiguration(reviewers="alice")

    def test_recovery_strategies_take_lists(self) -> None:
        """recovery_strategies values may be lists; they are stored as tuples."""
        config = WorkflowConfiguration(recovery_strategies={"transient": ["wait_for_breakers"]})
        assert config.recovery_strategies == {"transient": ("wait_for_breakers",)}
        with pytest.raises(ConfigurationError, match=r"invalid recovery_strategies\.transient"):
            WorkflowConfiguration(recovery_strategies={"transient": "wait_for_breakers"})

    def test_circuit_breakers_take_plain_mappings_or_breaker_settings(self) -> None:
        """{"github": {"failure_threshold": 3, "recovery_timeout": 1.0}} is BreakerSettings."""
        config = WorkflowConfiguration(circuit_breakers={
            "github": {"failure_threshold": 3, "recovery_timeout": 1.0},
            "db": BreakerSettings(2, 5.0)})
        assert config.circuit_breakers["github"] == BreakerSettings(3, 1.0)
        assert config.breaker_settings("github") == BreakerSettings(3, 1.0)
        assert config.circuit_breakers["db"] == BreakerSettings(2, 5.0)
        with pytest.raises(ConfigurationError, match=r"invalid circuit_breakers\.db"):
            WorkflowConfiguration(circuit_breakers={"db": {"failure_threshold": 0,
                                                           "recovery_timeout": 1}})

    def test_github_forge_settings_built_in_python(self) -> None:
        """WorkflowConfiguration(forge="github", github_repository="o/r") is accepted."""
        config = WorkflowConfiguration(forge="github", github_repository="o/r")
        assert (config.forge, config.github_repository) == ("github", "o/r")
        assert settings_of(config) == DevelopmentSettings(forge="github",
                                                          github_repository="o/r")

    def test_replace_keeps_and_changes_section_settings(self) -> None:
        """replace() carries section settings over and checks new ones like the constructor."""
        config = WorkflowConfiguration(forge="local", reviewers=["ann"])
        changed = config.replace(max_retries=7, base_branch="trunk")
        assert (changed.forge, changed.reviewers, changed.max_retries,
                changed.base_branch) == ("local", ("ann",), 7, "trunk")
        assert config.replace() == config
        with pytest.raises(ConfigurationError, match="invalid forge"):
            config.replace(forge="gitlab")


@dataclasses.dataclass(frozen=True)
class _ReportSettings:
    report_url: str = ""
    report_key: str = dataclasses.field(default="", repr=False)
    report_retries: int = 2


def _check_report(name: str, value: Any, source: str) -> None:
    if name == "report_retries" and (type(value) is not int or value < 0):
        raise setting_error(name, value, source, "a whole number >= 0")


register_settings_section(SettingsSection(
    "test-report", _ReportSettings, _check_report, secrets=frozenset({"report_key"}),
    secret_environment=("REPORT_TEST_KEY",)))


class TestSettingsSections:
    def test_a_section_s_settings_come_from_arguments_file_and_environment(
            self, tmp_path: Path) -> None:
        """Registered names are flat settings everywhere, with the usual precedence."""
        path = write_config(tmp_path, {"report_url": "https://file", "report_retries": 4})
        config = load_configuration(path, environ={"WORKFLOW_REPORT_RETRIES": "9"})
        assert (config.report_url, config.report_retries) == ("https://file", 9)
        assert config.section(_ReportSettings) == _ReportSettings("https://file", "", 9)
        assert WorkflowConfiguration(report_retries=1).report_retries == 1
        assert WorkflowConfiguration().section(_ReportSettings) == _ReportSettings()

    def test_a_section_s_checker_names_the_source(self, tmp_path: Path) -> None:
        """The section's own check refuses a bad value, naming field and source."""
        with pytest.raises(ConfigurationError, match=(
                r"invalid report_retries = -1 \(from environment variable "
                r"WORKFLOW_REPORT_RETRIES\): expected a whole number >= 0")):
            load_configuration(environ={"WORKFLOW_REPORT_RETRIES": "-1"})
        with pytest.raises(ConfigurationError, match=r"\(from argument\)"):
            WorkflowConfiguration(report_retries=-1)

    def test_a_section_s_secrets_are_hidden_and_known(self) -> None:
        """Secret fields are *** in redacted(), absent from repr, listed by secret_values."""
        config = WorkflowConfiguration(report_key="k-123456")
        assert config.redacted()["report_key"] == "***"
        assert "k-123456" not in repr(config)
        assert set(config.secret_values({"REPORT_TEST_KEY": "env-key"})) >= {
            "k-123456", "env-key"}

    def test_an_unregistered_name_is_one_error_naming_it_and_its_source(self) -> None:
        """A name no section registered: ConfigurationError with the name and the source."""
        with pytest.raises(ConfigurationError, match=(
                r"^unknown setting 'forgee' \(from argument\); known: .*forge")):
            WorkflowConfiguration(forgee="github")
        with pytest.raises(ConfigurationError, match=(
                r"^unknown setting 'forgee' \(from command-line option\)")):
            load_configuration(environ={}, forgee="github")

    def test_a_name_owned_twice_is_refused(self) -> None:
        """A section may not take a core setting's name or another section's."""
        @dataclasses.dataclass(frozen=True)
        class Clash:
            max_retries: int = 1

        with pytest.raises(ValueError, match="already belongs to the core"):
            register_settings_section(SettingsSection("clash", Clash, _check_report))


class TestRefusals:
    @pytest.mark.parametrize(("data", "expected"), [
        ({"max_retries": -1},
         "invalid max_retries = -1 (from configuration file {path}): "
         "expected a whole number from 0 to 100"),
        ({"max_retries": "3"},
         "invalid max_retries = '3' (from configuration file {path}): "
         "expected a whole number from 0 to 100"),
        ({"max_retries": True},
         "invalid max_retries = True (from configuration file {path}): "
         "expected a whole number from 0 to 100"),
        ({"log_level": "LOUD"},
         "invalid log_level = 'LOUD' (from configuration file {path}): "
         "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ({"durability": "eventual"},
         "invalid durability = 'eventual' (from configuration file {path}): "
         "expected one of strict, overlapped"),
        ({"tune_interpreter": "yes"},
         "invalid tune_interpreter = 'yes' (from configuration file {path}): "
         "expected true or false"),
        ({"enable_monitoring": "yes"},
         "invalid enable_monitoring = 'yes' (from configuration file {path}): "
         "expected true or false"),
        ({"timeout_multiplier": 0},
         "invalid timeout_multiplier = 0 (from configuration file {path}): "
         "expected a finite number > 0"),
        ({"state_directory": 5},
         "invalid state_directory = 5 (from configuration file {path}): expected a string"),
        ({"checkpoint_frequency": 0},
         "invalid checkpoint_frequency = 0 (from configuration file {path}): "
         "expected a whole number >= 1"),
        ({"github_repository": "just-a-name"},
         "invalid github_repository = 'just-a-name' (from configuration file {path}): "
         "expected owner/name"),
    ], ids=["negative-retries", "string-retries", "bool-retries", "log-level", "durability",
            "tuning-flag", "bool-field",
            "zero-multiplier", "directory-type", "checkpoint-frequency", "repository"])
    def test_bad_file_value_names_field_source_and_accepted(
            self, tmp_path: Path, data: dict[str, Any], expected: str) -> None:
        """A wrong value in the file is refused with field, file and accepted values."""
        path = write_config(tmp_path, data)
        with pytest.raises(ConfigurationError) as raised:
            load_configuration(path, environ={})
        assert str(raised.value) == expected.format(path=path)

    @pytest.mark.parametrize(("variable", "raw", "expected"), [
        ("WORKFLOW_TIMEOUT_MULTIPLIER", "nan",
         "invalid timeout_multiplier = nan (from environment variable "
         "WORKFLOW_TIMEOUT_MULTIPLIER): expected a finite number > 0"),
        ("WORKFLOW_TIMEOUT_MULTIPLIER", "inf",
         "invalid timeout_multiplier = inf (from environment variable "
         "WORKFLOW_TIMEOUT_MULTIPLIER): expected a finite number > 0"),
        ("WORKFLOW_MAX_RETRIES", "-2",
         "invalid max_retries = -2 (from environment variable WORKFLOW_MAX_RETRIES): "
         "expected a whole number from 0 to 100"),
        ("WORKFLOW_MAX_RETRIES", "three",
         "invalid max_retries = 'three' (from environment variable WORKFLOW_MAX_RETRIES): "
         "expected a whole number"),
        ("WORKFLOW_ENABLE_RECOVERY", "maybe",
         "invalid enable_recovery = 'maybe' (from environment variable "
         "WORKFLOW_ENABLE_RECOVERY): expected true or false"),
        ("WORKFLOW_LOG_LEVEL", "verbose",
         "invalid log_level = 'verbose' (from environment variable WORKFLOW_LOG_LEVEL): "
         "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ], ids=["nan", "inf", "negative", "word", "bool", "log-level"])
    def test_bad_environment_value_names_the_variable(self, variable: str, raw: str,
                                                      expected: str) -> None:
        """A wrong WORKFLOW_* value is refused naming the variable and what is accepted."""
        with pytest.raises(ConfigurationError) as raised:
            load_configuration(environ={variable: raw})
        assert str(raised.value) == expected

    def test_unknown_key_in_file_is_refused_listing_known_ones(self, tmp_path: Path) -> None:
        """A misspelt setting in the file is an error that lists the real names."""
        path = write_config(tmp_path, {"max_retry": 3})
        with pytest.raises(ConfigurationError, match=(
                r"unknown setting 'max_retry' \(from configuration file .*\); known: .*"
                r"max_retries")):
            load_configuration(path, environ={})

    def test_bad_breaker_settings_name_the_breaker(self, tmp_path: Path) -> None:
        """circuit_breakers.github with a zero threshold is refused by its full name."""
        path = write_config(tmp_path, {"circuit_breakers": {
            "github": {"failure_threshold": 0, "recovery_timeout": 300}}})
        with pytest.raises(ConfigurationError, match=r"invalid circuit_breakers\.github"):
            load_configuration(path, environ={})

    @pytest.mark.parametrize(("content", "message"), [
        ("{not json", "is not valid JSON: .* at line 1, column 2"),
        ("[1, 2]", "must hold a JSON object"),
    ])
    def test_unreadable_file_says_why(self, tmp_path: Path, content: str,
                                      message: str) -> None:
        """Broken JSON names the file and position; a non-object is refused."""
        path = tmp_path / "config.json"
        path.write_text(content)
        with pytest.raises(ConfigurationError, match=message):
            load_configuration(path, environ={})

    def test_missing_file_is_named(self, tmp_path: Path) -> None:
        """A configuration file that does not exist is an error naming it."""
        with pytest.raises(ConfigurationError, match="does not exist"):
            load_configuration(tmp_path / "absent.json", environ={})

    def test_direct_construction_is_checked_too(self) -> None:
        """WorkflowConfiguration(max_retries=-1) is refused with source 'argument'."""
        with pytest.raises(ConfigurationError, match=r"invalid max_retries = -1 \(from argument\)"):
            WorkflowConfiguration(max_retries=-1)

    def test_configuration_error_is_a_value_error(self) -> None:
        """Callers may catch ValueError."""
        assert issubclass(ConfigurationError, ValueError)
