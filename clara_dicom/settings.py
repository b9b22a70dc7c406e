"""Settings of every component (pydantic-settings), with one environment-variable
convention and one precedence.

Convention: the environment variable of a setting is ``CLARA_`` + the setting's
name in upper snake case (``dicomPort`` -> ``CLARA_DICOM_PORT``). A name means one
thing in every component, so settings several components share have one
variable (``resultsUrl`` -> ``CLARA_RESULTS_URL``: the Results Service for the
adapter, the operator and register-results), and settings of one component are
named for what they are (``resultsPort`` is the Results Service's port). Older
names still work; :data:`ENV_ALIASES` lists them and docs/reference.md shows them
as deprecated.

Precedence, highest first: command-line flag > environment > settings file >
default. A bad value is one line naming the setting, where it came from and its
environment variable (:class:`clara_dicom.errors.UserError`, exit status 2).
"""
from __future__ import annotations

import contextvars
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, TypeVar

import yaml
from pydantic import AliasChoices, AliasGenerator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from clara_dicom.errors import UserError

ENV_PREFIX = "CLARA_"

#: Environment names kept working for settings whose variable used to be spelled
#: differently: setting -> (older names, each ``(name, why)``). The first name that
#: is set wins after the conventional one.
ENV_ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "prepareImage": (("CLARA_DICOM_IMAGE", "deprecated"),),
    "jobId": (("NVIDIA_CLARA_JOBID", "Clara Deploy"),),
    "pipelineId": (("NVIDIA_CLARA_PIPELINEID", "Clara Deploy"),),
    "payloadId": (("NVIDIA_CLARA_PAYLOADID", "Clara Deploy"),),
}


def env_name(setting: str) -> str:
    """The conventional environment variable of a setting: ``reserveSpaceGB`` -> ``CLARA_RESERVE_SPACE_GB``."""
    return ENV_PREFIX + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", setting).upper()


def env_names(setting: str) -> list[str]:
    """Every environment variable a setting is read from, the conventional one first."""
    return [env_name(setting)] + [name for name, _ in ENV_ALIASES.get(setting, ())]


def _validation_alias(setting: str) -> AliasChoices:
    return AliasChoices(*env_names(setting))


# What the settings being loaded are read from (set by ComponentSettings.load). Built
# directly (``AdapterSettings(dicomPort=1)``), a settings class reads no environment.
_SOURCES: contextvars.ContextVar[tuple[Mapping[str, str], dict[str, Any]]] = contextvars.ContextVar("_SOURCES")


class _Environment(EnvSettingsSource):
    """The environment, or the mapping handed to ``load`` (tests)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env, _ = _SOURCES.get(({}, {}))
        return {k: v for k, v in env.items() if v is not None and v.strip() != ""}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Found under any of its names, handed on under the setting's own name, as the
        # other sources do, so that precedence decides and no two keys compete.
        value, _, is_complex = super().get_field_value(field, field_name)
        return value, field_name, is_complex


class _SettingsFile(PydanticBaseSettingsSource):
    """The settings file's mapping (already read by ``load``)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        raise NotImplementedError  # __call__ hands the whole mapping over

    def __call__(self) -> dict[str, Any]:
        return dict(_SOURCES.get(({}, {}))[1])


S = TypeVar("S", bound="ComponentSettings")


class ComponentSettings(BaseSettings):
    """Base of each component's settings class."""

    model_config = SettingsConfigDict(
        extra="forbid", validate_assignment=True, case_sensitive=True, env_ignore_empty=True,
        validate_by_name=True, validate_by_alias=True,
        alias_generator=AliasGenerator(validation_alias=_validation_alias),
    )
    #: The component's name in the settings table (docs/reference.md).
    component: ClassVar[str] = ""
    #: setting -> its command-line flag (for messages and the table).
    flags: ClassVar[dict[str, str]] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (passed as init arguments) > environment > settings file; defaults last.
        return init_settings, _Environment(settings_cls), _SettingsFile(settings_cls)

    @classmethod
    def model_json_schema(cls, by_alias: bool = False, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema of a settings file: keys are setting names (the aliases are environment names)."""
        return super().model_json_schema(by_alias, *args, **kwargs)

    @classmethod
    def load(cls: type[S], file: str | Path | None = None, env: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> S:
        """The settings from flags (``None`` = not given), the environment and a settings file."""
        env = os.environ if env is None else env
        data = read_settings_file(file) if file else {}
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        token = _SOURCES.set((env, data))
        try:
            return cls(**given)
        except ValidationError as exc:
            raise UserError(cls._explain(exc, file, env, given, data)) from None
        except SettingsError as exc:  # a list or mapping setting whose variable is not JSON
            found = re.search(r'field "(\w+)"', str(exc))
            setting = found.group(1) if found else "settings"
            variable = next((n for n in env_names(setting) if (env.get(n) or "").strip()), env_name(setting))
            raise UserError(f"{setting} (from environment variable {variable}): not valid JSON") from None
        finally:
            _SOURCES.reset(token)

    @classmethod
    def _explain(cls, exc: ValidationError, file: str | Path | None, env: Mapping[str, str],
                 given: Mapping[str, Any], data: Mapping[str, Any]) -> str:
        """One line: the setting, where its value came from, its variable, what is wrong."""
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        setting = next((name for name in cls.model_fields if key == name or key in env_names(name)), key)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            return f"{key} (from settings file {file}): unknown setting (check the spelling)"
        if setting not in cls.model_fields:  # a rule over several settings (model validator)
            return f"settings: {msg}"
        variable = next((n for n in env_names(setting) if (env.get(n) or "").strip()), None)
        if setting in given:
            src = f"command line {cls.flags.get(setting, setting)}"
        elif variable:
            src = f"environment variable {variable}"
        elif setting in data:
            src = f"settings file {file}"
        else:
            src = "default"
        hint = "" if src.startswith("environment") else f"; env {env_name(setting)}"
        return f"{setting} (from {src}{hint}): {msg}"

    @staticmethod
    def table_default(field: FieldInfo) -> str:
        """A field's default as the settings table shows it."""
        value = field.get_default(call_default_factory=True)
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return str(value).lower()
        if value in ("", [], {}):
            return "empty"
        return str(value)


class LogSettings(ComponentSettings):
    """Logging, common to every command (clara-dicom and register-results)."""

    component: ClassVar[str] = "every command"
    flags: ClassVar[dict[str, str]] = {"logLevel": "--log-level", "logFormat": "--log-format"}

    logLevel: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Least severe level logged.")
    logFormat: Literal["text", "json"] = Field("text", description="text lines for people, or one JSON object a "
                                              "line for a log indexer.")

    @field_validator("logLevel", "logFormat", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip()
        return value.upper() if info.field_name == "logLevel" else value.lower()


def read_token_file(path: str, flag: str = "--token-file") -> str:
    """The token in ``path``, surrounding whitespace stripped (one-line UserError if unusable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise UserError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text") from None
    if not token:
        raise UserError(f"{flag} {path} is empty")
    return token


def results_token(token: str | None, token_file: str | None, flag: str = "resultsTokenFile") -> str | None:
    """The Results Service token, the same rule for every component: the file's
    (a mounted Secret) when one is named, else ``token``; None when neither."""
    if token_file:
        return read_token_file(token_file, flag)
    return (token or "").strip() or None


def read_settings_file(file: str | Path) -> dict[str, Any]:
    path = Path(file)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UserError(f"settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"settings file {path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"settings file {path}: expected a mapping of setting: value")
    return {str(k): v for k, v in data.items()}
