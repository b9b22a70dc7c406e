"""Every component's settings (pydantic-settings): one environment convention, the
precedence flag > environment > settings file > default, old names still read, and
a bad value is one line naming the setting and its variable (exit status 2)."""
from __future__ import annotations

import pytest

from clara_adapter.settings import AdapterSettings
from clara_dicom.cli import main
from clara_dicom.errors import UserError
from clara_dicom.settings import ENV_ALIASES, LogSettings, env_name, env_names
from clara_operator.settings import OperatorSettings
from clara_results.settings import RegisterSettings, ResultsServiceSettings

CLASSES = [LogSettings, AdapterSettings, OperatorSettings, ResultsServiceSettings, RegisterSettings]


def test_one_name_means_one_type_in_every_component():
    seen: dict[str, tuple[str, object]] = {}
    for cls in CLASSES:
        for name, field in cls.model_fields.items():
            var = env_name(name)
            assert var.startswith("CLARA_") and var == var.upper()
            if var in seen:
                assert seen[var][1] == field.annotation, f"{var}: {seen[var][0]} and {cls.__name__} disagree"
            seen[var] = (cls.__name__, field.annotation)
    for setting in ENV_ALIASES:
        assert any(setting in cls.model_fields for cls in CLASSES), setting


@pytest.mark.parametrize("cls, setting, flag_value, env_value, file_value", [
    (AdapterSettings, "exportConcurrency", 3, "4", 5),
    (OperatorSettings, "resyncSeconds", 3.0, "4", 5.0),
    (ResultsServiceSettings, "resultsMaxRetries", 3, "4", 5),
    (RegisterSettings, "resultsAttempts", 3, "4", 5),
])
def test_flag_beats_environment_beats_file_beats_default(tmp_path, cls, setting, flag_value, env_value, file_value):
    f = tmp_path / "s.yaml"
    f.write_text(f"{setting}: {file_value}\n")
    var = env_name(setting)
    default = cls.model_fields[setting].default
    assert getattr(cls.load(env={}), setting) == default
    assert getattr(cls.load(f, env={}), setting) == file_value
    assert getattr(cls.load(f, env={var: env_value}), setting) == float(env_value)
    assert getattr(cls.load(f, env={var: env_value}, flags={setting: flag_value}), setting) == flag_value
    assert getattr(cls.load(f, env={var: ""}), setting) == file_value  # an empty variable is not set


def test_old_names_are_still_read_and_the_conventional_one_wins():
    assert OperatorSettings.load(env={"CLARA_DICOM_IMAGE": "old:1"}).prepareImage == "old:1"
    both = {"CLARA_DICOM_IMAGE": "old:1", "CLARA_PREPARE_IMAGE": "new:2"}
    assert OperatorSettings.load(env=both).prepareImage == "new:2"
    assert RegisterSettings.load(env={"NVIDIA_CLARA_JOBID": "j-1"}).jobId == "j-1"
    assert env_names("jobId") == ["CLARA_JOB_ID", "NVIDIA_CLARA_JOBID"]


def test_settings_built_directly_read_no_environment(monkeypatch):
    monkeypatch.setenv("CLARA_DICOM_PORT", "4242")
    assert AdapterSettings().dicomPort == 11112
    assert AdapterSettings.load().dicomPort == 4242


@pytest.mark.parametrize("cls, env, flags, expected", [
    (AdapterSettings, {"CLARA_EXPORT_CONCURRENCY": "many"}, {},
     "exportConcurrency (from environment variable CLARA_EXPORT_CONCURRENCY): "),
    (AdapterSettings, {}, {"dicomPort": 0}, "dicomPort (from command line --dicom-port; env CLARA_DICOM_PORT): "),
    (OperatorSettings, {"CLARA_NODE_SELECTOR": "gpu=a100"}, {},
     "nodeSelector (from environment variable CLARA_NODE_SELECTOR): not valid JSON"),
    (OperatorSettings, {"CLARA_NAMESPACE": "a", "CLARA_ALL_NAMESPACES": "true"}, {}, "exclude each other"),
    (ResultsServiceSettings, {"CLARA_RESULTS_RETENTION": "inf"}, {},
     "resultsRetention (from environment variable CLARA_RESULTS_RETENTION): must be a finite number"),
    (RegisterSettings, {"CLARA_RESULTS_ATTEMPTS": "0"}, {},
     "resultsAttempts (from environment variable CLARA_RESULTS_ATTEMPTS): Input should be greater than or equal to 1"),
    (LogSettings, {"CLARA_LOG_LEVEL": "loud"}, {}, "logLevel (from environment variable CLARA_LOG_LEVEL)"),
])
def test_a_bad_value_is_one_line_naming_setting_and_variable(cls, env, flags, expected):
    with pytest.raises(UserError) as exc:
        cls.load(env=env, flags=flags)
    assert expected in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("argv, env, expected", [
    (["results-service", "--port", "99999"], {"CLARA_RESULTS_TOKEN": "t"},
     "resultsPort (from command line --port; env CLARA_RESULTS_PORT)"),
    (["results-service"], {"CLARA_RESULTS_TOKEN": "t", "CLARA_RESULTS_MAX_RETRIES": "0"},
     "resultsMaxRetries (from environment variable CLARA_RESULTS_MAX_RETRIES)"),
    (["results-service", "--lease-seconds", "soon"], {"CLARA_RESULTS_TOKEN": "t"},
     "resultsLeaseSeconds (from command line --lease-seconds"),
    (["register-results", "--agent", "ClaraSCU"], {"CLARA_RESULTS_TIMEOUT": "-1"},
     "resultsTimeout (from environment variable CLARA_RESULTS_TIMEOUT)"),
])
def test_commands_stop_with_one_line_and_status_2(argv, env, expected, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err


def test_results_service_reads_its_environment(monkeypatch, tmp_path):
    from clara_results.cli_service import load
    from clara_dicom.cli import build_parser

    token = tmp_path / "token"
    token.write_text("from-file\n")
    monkeypatch.setenv("CLARA_RESULTS_PORT", "9999")
    monkeypatch.setenv("CLARA_RESULTS_LEASE_SECONDS", "12.5")
    monkeypatch.setenv("CLARA_RESULTS_TOKEN", "from-env")
    s = load(build_parser().parse_args(["results-service", "--port", "7000"]))
    assert (s.resultsPort, s.resultsLeaseSeconds, s.token()) == (7000, 12.5, "from-env")
    monkeypatch.setenv("CLARA_RESULTS_TOKEN_FILE", str(token))
    assert load(build_parser().parse_args(["results-service"])).token() == "from-file"


def test_every_component_reads_the_results_token_by_one_rule(tmp_path):
    """The token file (a mounted Secret) wins over an inline token in the adapter, the
    Results Service and register-results alike; an empty file is an error, not no token."""
    from clara_adapter.settings import AdapterSettings
    from clara_results.settings import RegisterSettings, ResultsServiceSettings
    from clara_dicom.settings import results_token

    token = tmp_path / "token"
    token.write_text("from-file\n")
    both = {"resultsToken": "inline", "resultsTokenFile": str(token)}
    assert AdapterSettings(**both).results_token() == "from-file"
    assert ResultsServiceSettings(**both).token() == "from-file"
    register = RegisterSettings(**both)
    assert results_token(register.resultsToken, register.resultsTokenFile) == "from-file"
    assert AdapterSettings(resultsToken=" inline ").results_token() == "inline"
    assert AdapterSettings().results_token() is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        AdapterSettings(resultsTokenFile=str(tmp_path / "empty")).results_token()


def _flag_helps(parser, path=()):
    """(command, flag, help) for every flag of every subcommand."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flag_helps(sub, (*path, name))
        elif action.help and action.option_strings:
            yield " ".join(path), action.option_strings[-1], " ".join(action.help.split())


def _same_value(shown: str, default: object) -> bool:
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(shown) == float(default)
        except ValueError:
            return False
    return shown.strip("'\"") == str(default)


def test_the_defaults_shown_in_help_are_the_settings_defaults():
    """`--help` states each flag's default and variable next to it (the CLI modules keep to the
    standard library at import, so they spell the default again): they must say what the
    settings classes actually do, or a user tunes against a wrong number."""
    import re

    from clara_dicom.cli import build_parser

    patterns = [r"default (?P<value>[^;()]+?)(?: = [^;)]+)?; env (?P<var>CLARA_\w+)",
                r"default: env (?P<var>CLARA_\w+), else (?P<value>\w+)\)",
                r"\(default (?P<value>[^)\s]+)\).*\(env (?P<var>CLARA_\w+)\)"]
    checked = []
    for command, flag, text in _flag_helps(build_parser()):
        for pattern in patterns:
            for found in re.finditer(pattern, text):
                value, var = found["value"], found["var"]
                defaults = {cls.model_fields[name].default for cls in CLASSES for name in cls.model_fields
                            if var in env_names(name)}
                assert defaults, f"{command} {flag}: help names {var}, which no setting reads"
                assert all(_same_value(value, d) for d in defaults), \
                    f"{command} {flag}: help says default {value}, settings say {defaults}"
                checked.append((command, flag))
    # Flags whose help gives a default but no variable: the command's own settings class.
    owners = {"adapter": AdapterSettings, "operator": OperatorSettings,
              "results-service": ResultsServiceSettings, "register-results": RegisterSettings}
    for command, flag, text in _flag_helps(build_parser()):
        found = re.search(r"default (?P<value>[\w./:-]+)[;)]", text)
        cls = owners.get(command)
        setting = next((s for s, f in cls.flags.items() if f == flag), None) if cls and found else None
        if setting and cls.model_fields[setting].default not in (None, ""):
            default = cls.model_fields[setting].default
            assert _same_value(found["value"], default), \
                f"{command} {flag}: help says default {found['value']}, settings say {default}"
            checked.append((command, flag))
    assert len(checked) >= 30, checked  # the patterns still find the helps
