"""`clara-dicom import FILE`: Clara Deploy configuration -> manifests on stdout.

Two inputs are understood (SPEC §7):

* a processor-settings JSON, the flat map of the AE Title Job Processor
  (``groupBy``, ``priority``, ``timeout``, ``pipeline-<key>: <pipeline ID>``),
  which becomes one JobProcessor;
* a whole DICOM adapter ``appsettings.json`` (Clara Deploy 0.5-0.8 spellings:
  ``ae-titles``/``aeTitles``, ``host-ip``/``hostIp`` ...), or just its
  ``dicom`` object, which becomes ClaraAETitle + JobProcessor (one per AE
  title), ClaraSource and ClaraDestination manifests.

Manifests go to stdout as multi-document YAML; warnings (one line each) and the
adapter settings that are not resources go to stderr. Every manifest is
validated with the same models the operator uses before anything is printed.

Only the standard library is imported at top level (see ``clara_dicom.cli``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clara_dicom.errors import UserError

PROG = "clara-dicom import"

# Clara's AE Title Job Processor, whatever the assembly suffix.
AETITLE_PROCESSOR_CLASS = "AeTitleJobProcessor"

# Level names and the tags that name the same thing (groupBy).
_LEVELS = {"patient": "Patient", "study": "Study", "series": "Series"}
_LEVEL_KEYWORDS = {"patientid": "Patient", "studyinstanceuid": "Study", "seriesinstanceuid": "Series"}
_LEVEL_TAGS = {0x00100020: "Patient", 0x0020000D: "Study", 0x0020000E: "Series"}
_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?$|^([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})$")

PRIORITIES = ("lower", "normal", "higher", "immediate")
MIN_TIMEOUT = 5

# Clara adapter settings -> our adapter setting (field, flag or None).
# The environment variable is CLARA_ + the field in upper snake case.
_SCP_SETTINGS = {
    "port": ("dicomPort", "--dicom-port"),
    "rejectunknownsources": ("rejectUnknownSources", None),
    "maximumnumberofassociations": ("maxAssociations", None),
}
_SCU_SETTINGS = {
    "aetitle": ("scuAeTitle", None),
    "maximumnumberofassociations": ("exportConcurrency", None),
}
_SCU_EXPORT_SETTINGS = {
    "failurethreshold": ("failureThreshold", None),
}
_STORAGE_SETTINGS = {
    "temporary": ("storageDir", "--storage"),
    "watermarkpercent": ("watermarkPercent", None),
    "reservespacegb": ("reserveSpaceGB", None),
}


def env_name(setting: str) -> str:
    """Environment variable of an adapter setting (same rule as clara_adapter.settings)."""
    return "CLARA_" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", setting).upper()


def _norm(key: Any) -> str:
    """Key spelling variants compare equal: aeTitles, ae-titles, AE_TITLES."""
    return re.sub(r"[-_\s]", "", str(key)).lower()


def _get(obj: dict[str, Any], *names: str) -> tuple[str | None, Any]:
    """(actual key, value) of the first key matching one of ``names`` (normalised)."""
    wanted = [_norm(n) for n in names]
    for want in wanted:
        for key, value in obj.items():
            if _norm(key) == want:
                return key, value
    return None, None


def dns_label(text: str, fallback: str = "imported", max_len: int = 63) -> str:
    """Lowercase DNS label derived from ``text`` (RFC 1123)."""
    s = re.sub(r"[^a-z0-9-]+", "-", str(text).strip().lower())
    s = re.sub(r"-{2,}", "-", s).strip("-")
    s = s[:max_len].rstrip("-")
    return s or fallback


class _Names:
    """Hands out unique DNS-label names within one kind."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.taken: set[str] = set()
        self.warn = warn

    def take(self, wanted: str, what: str) -> str:
        base = dns_label(wanted)
        name, n = base, 1
        while name in self.taken:
            n += 1
            suffix = f"-{n}"
            name = base[: 63 - len(suffix)].rstrip("-") + suffix
        if name != base:
            self.warn(f"{what}: name {base!r} is already used; named {name!r} instead")
        self.taken.add(name)
        return name


@dataclass
class ImportResult:
    manifests: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # (our setting, value, flag or None, Clara key path)
    settings: list[tuple[str, Any, str | None, str]] = field(default_factory=list)
    kind: str = ""  # "processor-settings" or "appsettings"

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def settings_comment(self) -> list[str]:
        """The adapter settings as a YAML comment block (one self-contained line each)."""
        if not self.settings:
            return []
        lines = ["# adapter settings from the Clara configuration (not resources): set them as flags, "
                 "environment variables or in the adapter settings file"]
        for setting, value, flag, clara_key in self.settings:
            text = _yaml_scalar(value)
            how = [f"{env_name(setting)}={text}"]
            if flag:
                how.insert(0, f"{flag} {text}")
            lines.append(f"#   {setting}: {text}    # from {clara_key}; or {' or '.join(how)}")
        return lines


def _json_type(value: Any) -> str:
    return {list: "array", dict: "object", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- JSON reading -------------------------------------------------------------


def _relax_json(text: str) -> str:
    """Blank out // and /* */ comments and trailing commas (as .NET's JSON reader
    accepts in appsettings.json), keeping every other character where it was so
    error positions stay right."""
    out = list(text)
    i, n = 0, len(text)
    in_string = False
    last_comma: int | None = None
    while i < n:
        c = text[i]
        if in_string:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
            continue
        if c == '"':
            in_string = True
            last_comma = None
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for j in range(i, end):
                if text[j] != "\n":
                    out[j] = " "
            i = end
            continue
        elif c == ",":
            last_comma = i
        elif c in "}]":
            if last_comma is not None:
                out[last_comma] = " "
            last_comma = None
        elif not c.isspace():
            last_comma = None
        i += 1
    return "".join(out)


def read_json(path: str) -> Any:
    if path == "-":
        text, where = sys.stdin.read(), "<stdin>"
    else:
        p = Path(path)
        where = str(p)
        if p.is_dir():
            raise UserError(f"{where}: is a folder; give a Clara JSON file")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise UserError(f"{where}: no such file") from None
        except UnicodeDecodeError:
            raise UserError(f"{where}: not a UTF-8 text file") from None
        except OSError as exc:
            raise UserError(f"{where}: cannot read: {exc.strerror}") from None
    if not text.strip():
        raise UserError(f"{where}: file is empty; expected Clara JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return json.loads(_relax_json(text))
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None


# --- value conversion -----------------------------------------------------------


def convert_group_by(value: Any, where: str) -> str:
    """Clara groupBy -> Patient/Study/Series, or a tag as 0020,000D."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: groupBy must be Patient, Study, Series or a DICOM tag (got {value!r})")
    text = value.strip()
    low = text.lower()
    if low in _LEVELS:
        return _LEVELS[low]
    if low in _LEVEL_KEYWORDS:
        return _LEVEL_KEYWORDS[low]
    m = _TAG_RE.match(text)
    if not m:
        raise UserError(
            f"{where}: groupBy {value!r} is not Patient, Study, Series or a tag like 0020,000D, (0020,000D) or 0020000D"
        )
    group, element = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    tag = int(group + element, 16)
    if tag in _LEVEL_TAGS:
        return _LEVEL_TAGS[tag]
    return f"{group.upper()},{element.upper()}"


def _as_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{where}: {what} must be an integer (got {value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    raise UserError(f"{where}: {what} must be an integer (got {value!r})")


def _as_bool(value: Any, what: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(f"{where}: {what} must be true or false (got {value!r})")


def processor_spec(settings: Any, where: str, result: ImportResult, processor_type: str = "aetitle") -> dict[str, Any]:
    """A JobProcessor spec from Clara's flat processor settings."""
    if not isinstance(settings, dict):
        raise UserError(f"{where}: processor settings must be a JSON object (got a JSON {_json_type(settings)})")
    group_by, priority, timeout = "Study", "normal", MIN_TIMEOUT
    pipelines: dict[str, str] = {}
    extra: dict[str, Any] = {}
    seen_keys: dict[str, str] = {}
    for key, value in settings.items():
        nkey = _norm(key)
        if nkey in ("groupby", "priority", "timeout"):
            if nkey in seen_keys:
                result.warn(f"{where}: {key!r} repeats {seen_keys[nkey]!r}; the later value wins")
            seen_keys[nkey] = key
        if nkey == "groupby":
            group_by = convert_group_by(value, where)
        elif nkey == "priority":
            if not isinstance(value, str) or value.strip().lower() not in PRIORITIES:
                raise UserError(f"{where}: priority must be one of {', '.join(PRIORITIES)} (got {value!r})")
            priority = value.strip().lower()
        elif nkey == "timeout":
            timeout = _as_int(value, "timeout", where)
            if timeout < MIN_TIMEOUT:
                result.warn(f"{where}: timeout {timeout} is below the minimum of {MIN_TIMEOUT} seconds; raised to {MIN_TIMEOUT}")
                timeout = MIN_TIMEOUT
        elif str(key).lower().startswith("pipeline-"):
            pkey = str(key)[len("pipeline-"):]
            if not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", pkey):
                raise UserError(
                    f"{where}: {key!r}: the pipeline key after 'pipeline-' must be 1-63 letters, digits, '-', '_' "
                    "or '.', starting and ending with a letter or digit"
                )
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: {key!r} must be a pipeline ID (a non-empty string, got {value!r})")
            clash = [k for k in pipelines if k.lower() == pkey.lower()]
            if clash:
                raise UserError(f"{where}: pipeline keys {clash[0]!r} and {pkey!r} differ only by case")
            pipelines[pkey] = value.strip()
        elif processor_type != "aetitle":
            extra[str(key)] = value  # a plug-in's own setting: its validator checks it
        else:
            result.warn(f"{where}: unknown processor setting {key!r} ignored "
                        "(the AE Title Job Processor knows groupBy, priority, timeout and pipeline-*)")
    if not pipelines:
        raise UserError(f"{where}: no pipeline-* setting; a JobProcessor needs at least one, "
                        "e.g. \"pipeline-lung\": \"<pipeline ID>\"")
    spec: dict[str, Any] = {"type": processor_type, "groupBy": group_by, "priority": priority,
                            "timeout": timeout, "pipelines": pipelines}
    if extra:
        spec["settings"] = extra
    return spec


def processor_type_from_class(class_name: Any, where: str, result: ImportResult) -> str:
    """Clara processor class ('Ns.AeTitleJobProcessor, Assembly') -> JobProcessor.spec.type."""
    if class_name is None or (isinstance(class_name, str) and not class_name.strip()):
        return "aetitle"
    if not isinstance(class_name, str):
        raise UserError(f"{where}: processor must be a .NET class name (got {class_name!r})")
    short = class_name.split(",")[0].strip().split(".")[-1]
    if short.lower() == AETITLE_PROCESSOR_CLASS.lower():
        return "aetitle"
    base = re.sub(r"(Job)?Processor$", "", short) or short
    base = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", base)
    type_name = dns_label(base, fallback="custom")
    result.warn(f"{where}: processor {class_name!r} is not the AE Title Job Processor; emitted type "
                f"{type_name!r}: install a processor plug-in under that name (entry point group clara_dicom.processors)")
    return type_name


# --- the two input shapes -----------------------------------------------------------


def _looks_like_processor_settings(data: dict[str, Any]) -> bool:
    return any(_norm(k) in ("groupby", "priority", "timeout") or str(k).lower().startswith("pipeline-")
               for k in data)


def _find_dicom(data: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any] | None] | None:
    """(the 'dicom' object, its path, the DicomAdapter object) if ``data`` is adapter settings."""
    key, adapter = _get(data, "DicomAdapter")
    if key is not None:
        if not isinstance(adapter, dict):
            raise UserError(f"{key} must be a JSON object")
        dkey, dicom = _get(adapter, "dicom")
        if dkey is None:
            raise UserError(f"{key} has no 'dicom' object (with scp and scu)")
        if not isinstance(dicom, dict):
            raise UserError(f"{key}.{dkey} must be a JSON object")
        return dicom, f"{key}.{dkey}", adapter
    dkey, dicom = _get(data, "dicom")
    if isinstance(dicom, dict) and (_get(dicom, "scp")[0] or _get(dicom, "scu")[0]):
        return dicom, str(dkey), None
    if _get(data, "scp")[0] or _get(data, "scu")[0]:
        return data, "", None
    return None


def _path(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def _list(obj: dict[str, Any], base: str, *names: str) -> tuple[str, list[Any]]:
    key, value = _get(obj, *names)
    where = _path(base, key or names[0])
    if value is None:
        return where, []
    if not isinstance(value, list):
        raise UserError(f"{where} must be a JSON array")
    return where, value


def _manifest(kind: str, name: str, spec: dict[str, Any], namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec}


def _text(entry: dict[str, Any], where: str, what: str, *names: str, required: bool = True) -> str | None:
    key, value = _get(entry, *names)
    if value is None:
        if required:
            raise UserError(f"{where}: {what} is missing (key {names[0]!r})")
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise UserError(f"{where}: {key} must be a non-empty string (got {value!r})")
    return str(value).strip()


_AE_KEYS = {"name", "aetitle", "processor", "processorsettings", "ignoredsopclasses", "allowedsopclasses",
            "overwritesameinstance"}
_SOURCE_KEYS = {"name", "aetitle", "hostip", "host"}
_DEST_KEYS = {"name", "aetitle", "hostip", "host", "port"}


def _warn_unknown(entry: dict[str, Any], known: set[str], where: str, result: ImportResult) -> None:
    for key in entry:
        if _norm(key) not in known:
            result.warn(f"{where}: unknown key {key!r} ignored")


def _collect_settings(obj: Any, base: str, table: dict[str, tuple[str, str | None]], result: ImportResult,
                      origin: str, skip: set[str] = frozenset()) -> None:
    if not isinstance(obj, dict):
        return
    for key, value in obj.items():
        nkey = _norm(key)
        if nkey in skip:
            continue
        where = _path(base, key)
        if nkey in table:
            setting, flag = table[nkey]
            result.settings.append((setting, value, flag, where))
        else:
            result.warn(f"{origin}: {where}: adapter setting not imported (no equivalent in clara-dicom)")


def convert_appsettings(data: dict[str, Any], origin: str, namespace: str | None = None) -> ImportResult:
    found = _find_dicom(data)
    if found is None:
        raise UserError(f"{origin}: not Clara configuration I know")
    dicom, base, adapter = found
    result = ImportResult(kind="appsettings")
    warn = result.warn

    scp_key, scp = _get(dicom, "scp")
    scu_key, scu = _get(dicom, "scu")
    scp_path, scu_path = _path(base, scp_key or "scp"), _path(base, scu_key or "scu")
    for key, value in ((scp_path, scp), (scu_path, scu)):
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{origin}: {key} must be a JSON object")
    scp = scp or {}
    scu = scu or {}
    if adapter is not None:
        ckey, crd = _get(adapter, "readAeTitlesFromCrd", "readDicomConfigurationsFromCrd")
        if crd is True:
            warn(f"{origin}: {ckey} is true: Clara read its AE titles, sources and destinations from its own CRDs; "
                 "only what this file lists is imported")

    processors = _Names(warn)
    aets = _Names(warn)
    sources = _Names(warn)
    dests = _Names(warn)
    jp_out: list[tuple[str, dict[str, Any]]] = []
    aet_out: list[tuple[str, dict[str, Any]]] = []
    other_out: list[tuple[str, dict[str, Any]]] = []

    where_list, entries = _list(scp, scp_path, "ae-titles", "aeTitles")
    seen_titles: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{origin}: {where_list}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a JSON object describing an AE title")
        _warn_unknown(entry, _AE_KEYS, where, result)
        name = _text(entry, where, "name", "name", required=False)
        title = _text(entry, where, "AE title", "aeTitle", "ae-title", required=False) or name
        if title is None:
            raise UserError(f"{where}: AE title is missing (keys 'name' or 'aeTitle')")
        where = f"{origin}: {where_list}[{i}] ({title})"
        if title in seen_titles:
            warn(f"{where}: AE title {title!r} is listed twice (also {seen_titles[title]}); "
                 "the later ClaraAETitle will be Ready=False, reason Conflict")
        seen_titles[title] = f"{where_list}[{i}]"
        ptype = processor_type_from_class(_get(entry, "processor")[1], where, result)
        settings = _get(entry, "processorSettings")[1]
        if settings is None:
            settings = {}
        spec = processor_spec(settings, where, result, ptype)
        obj_name = name or title
        jp_name = processors.take(obj_name, f"{where}: JobProcessor")
        aet_name = aets.take(obj_name, f"{where}: ClaraAETitle")
        jp_out.append((where, _manifest("JobProcessor", jp_name, spec, namespace)))
        aspec: dict[str, Any] = {"aeTitle": title, "processor": jp_name}
        for key in ("ignoredSopClasses", "allowedSopClasses"):
            k, v = _get(entry, key)
            if v is None:
                continue
            if not isinstance(v, list):
                raise UserError(f"{where}: {k} must be a JSON array of SOP Class UIDs")
            if v:
                aspec[key] = [str(x).strip() if isinstance(x, str) else x for x in v]
        k, v = _get(entry, "overwriteSameInstance")
        if v is not None:
            aspec["overwriteSameInstance"] = _as_bool(v, k, where)
        aet_out.append((where, _manifest("ClaraAETitle", aet_name, aspec, namespace)))

    where_list, entries = _list(scp, scp_path, "sources")
    for i, entry in enumerate(entries):
        where = f"{origin}: {where_list}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a JSON object with ae-title and host-ip")
        _warn_unknown(entry, _SOURCE_KEYS, where, result)
        title = _text(entry, where, "AE title", "aeTitle", "ae-title")
        host = _text(entry, where, "host", "hostIp", "host-ip", "host")
        name = sources.take(_text(entry, where, "name", "name", required=False) or title, f"{where}: ClaraSource")
        other_out.append((where, _manifest("ClaraSource", name, {"aeTitle": title, "host": host}, namespace)))

    where_list, entries = _list(scu, scu_path, "destinations")
    for i, entry in enumerate(entries):
        where = f"{origin}: {where_list}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a JSON object with name, host-ip, port and ae-title")
        _warn_unknown(entry, _DEST_KEYS, where, result)
        title = _text(entry, where, "AE title", "aeTitle", "ae-title")
        host = _text(entry, where, "host", "hostIp", "host-ip", "host")
        pkey, port = _get(entry, "port")
        if port is None:
            raise UserError(f"{where}: port is missing")
        port = _as_int(port, "port", where)
        given = _text(entry, where, "name", "name", required=False) or title
        name = dests.take(given, f"{where}: ClaraDestination")
        if name != given.lower():
            warn(f"{where}: destination {given!r} is named {name!r}: use that name in register-results --data")
        spec = {"aeTitle": title, "host": host, "port": port}
        other_out.append((where, _manifest("ClaraDestination", name, spec, namespace)))

    # Adapter settings: not resources; say where they go now.
    _collect_settings(scp, scp_path, _SCP_SETTINGS, result, origin, skip={"aetitles", "sources"})
    export_key, export = _get(scu, "export")
    _collect_settings(scu, scu_path, _SCU_SETTINGS, result, origin, skip={"destinations", "export"})
    _collect_settings(export, _path(scu_path, export_key or "export"), _SCU_EXPORT_SETTINGS, result, origin)
    if adapter is not None:
        adapter_path = base.split(".", 1)[0]
        skey, storage = _get(adapter, "storage")
        _collect_settings(storage, _path(adapter_path, skey or "storage"), _STORAGE_SETTINGS, result, origin)
        for key in adapter:
            if _norm(key) not in ("dicom", "storage", "readaetitlesfromcrd", "readdicomconfigurationsfromcrd",
                                  "crdreadintervals"):
                result.warn(f"{origin}: {_path(adapter_path, key)}: adapter setting not imported "
                            "(no equivalent in clara-dicom)")

    for where, manifest in jp_out + aet_out + other_out:
        result.manifests.append(_validated(manifest, where))
    if not result.manifests:
        warn(f"{origin}: no AE titles, sources or destinations found; nothing to import")
    return result


def convert_processor_settings(data: dict[str, Any], origin: str, name: str, namespace: str | None = None
                               ) -> ImportResult:
    result = ImportResult(kind="processor-settings")
    spec = processor_spec(data, origin, result)
    result.manifests.append(_validated(_manifest("JobProcessor", name, spec, namespace), origin))
    return result


def _validated(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a manifest with the models the operator uses; UserError (one line) if it is not valid."""
    from clara_dicom.manifests import parse_resource

    parse_resource(manifest, where)  # raises ManifestError (a UserError) naming object and field
    return manifest


def default_name(path: str) -> str:
    return "imported" if path in ("-", "<stdin>") else dns_label(Path(path).stem)


def convert(data: Any, origin: str, name: str | None = None, namespace: str | None = None) -> ImportResult:
    """Decoded Clara JSON -> manifests, warnings and adapter settings."""
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a JSON object (processor settings or appsettings.json), "
                        f"got a JSON {_json_type(data)}")
    if _find_dicom(data) is not None:
        result = convert_appsettings(data, origin, namespace)
        if name:
            result.warn("--name applies to processor-settings files only; names come from the AE titles")
        return result
    if _looks_like_processor_settings(data):
        wanted = name or default_name(origin)
        final = dns_label(wanted)
        result = convert_processor_settings(data, origin, final, namespace)
        if name and final != name:
            result.warn(f"--name {name!r} is not a DNS name; using {final!r}")
        return result
    keys = ", ".join(repr(k) for k in list(data)[:5]) or "none"
    raise UserError(f"{origin}: not Clara configuration I know (top-level keys: {keys}); expected processor settings "
                    "(groupBy, priority, timeout, pipeline-*) or an appsettings.json with DicomAdapter.dicom")


def import_file(path: str, name: str | None = None, namespace: str | None = None) -> ImportResult:
    origin = "<stdin>" if path == "-" else path
    result = convert(read_json(path), origin, name, namespace)
    return result


def render(result: ImportResult, source: str) -> str:
    import yaml

    head = f"# generated by clara-dicom import {source}\n"
    if not result.manifests:
        return head
    return head + yaml.safe_dump_all(result.manifests, sort_keys=False, default_flow_style=False, explicit_start=True)


# --- CLI --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert Clara Deploy configuration to clara-dicom manifests (multi-document YAML on stdout): "
        "a processor-settings JSON (groupBy, priority, timeout, pipeline-*) becomes a JobProcessor; an "
        "appsettings.json of the Clara DICOM adapter becomes ClaraAETitle, JobProcessor, ClaraSource and "
        "ClaraDestination manifests. Warnings and adapter settings go to stderr."
    )
    parser.add_argument("file", metavar="FILE", help="Clara JSON file ('-' for stdin)")
    parser.add_argument("--name", help="JobProcessor name for a processor-settings file (default: from FILE's name)")
    parser.add_argument("--namespace", "-n", help="set metadata.namespace on every manifest")


def run(args: argparse.Namespace) -> int:
    result = import_file(args.file, name=args.name, namespace=args.namespace)
    for line in result.warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    for line in result.settings_comment():
        print(line, file=sys.stderr)
    sys.stdout.write(render(result, args.file))
    sys.stdout.flush()
    return 0
