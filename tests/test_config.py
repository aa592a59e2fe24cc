"""Configuration: the spec's defaults, a JSON file, WORKFLOW_* variables, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reliability import (
    BreakerSettings,
    ConfigurationError,
    WorkflowConfiguration,
    load_configuration,
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

    def test_added_fields_have_the_design_s_defaults(self) -> None:
        """Forge settings and breakers default as the README's Configuration section says."""
        config = WorkflowConfiguration()
        assert config.github_api_url == "https://api.github.com"
        assert config.forge in ("auto", "local") and config.resolved_forge == "local"
        assert dict(config.circuit_breakers) == {
            "github": BreakerSettings(3, 300.0), "implementation": BreakerSettings(5, 600.0),
            "system": BreakerSettings(2, 120.0)}

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

    def test_github_token_comes_from_the_environment_and_is_never_shown(self) -> None:
        """GITHUB_TOKEN fills github_token; repr() and redacted() hide it."""
        config = load_configuration(environ={"GITHUB_TOKEN": "ghp_secret"})
        assert config.github_token == "ghp_secret"
        assert "ghp_secret" not in repr(config)
        assert config.redacted()["github_token"] == "***"
        assert "ghp_secret" not in json.dumps(config.redacted(), default=str)


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
