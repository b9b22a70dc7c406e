"""Resource models for every custom resource kind (SPEC §2): the one source of truth.

The CRD schemas in ``crds/`` are generated from these models (see
``clara_operator.crdgen``), so descriptions, defaults, enums and patterns are
written once, here. Rules that a Kubernetes structural schema can express are
written as field constraints (patterns, bounds, enums); cross-field rules carry
their CEL twin in ``x-kubernetes-validations`` next to the Python check, and a
test checks that both agree.

Patterns are RE2-compatible (no look-arounds) because the API server evaluates
them with Go's regexp.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GROUP = "dicom.clara.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# --- value rules ------------------------------------------------------------

# DICOM AE title (PS3.5 VR "AE"): 1-16 characters of the default repertoire,
# no backslash, no control characters. Leading/trailing spaces are not
# significant in DICOM, so we refuse them to keep titles unambiguous.
AE_TITLE_PATTERN = r"^[!-\[\]-~]([ -\[\]-~]{0,14}[!-\[\]-~])?$"
# Kubernetes object name (DNS-1123 subdomain, as used for references).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# DICOM UID: digits separated by dots, at most 64 characters.
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
# A pipeline key (map key in JobProcessor.pipelines); lowercased into job names.
PIPELINE_KEY_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
# groupBy: a level name, or a tag as 0020,000D / (0020,000D) / 0020000D.
GROUP_BY_PATTERN = (
    r"^(Patient|Study|Series|[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}|"
    r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)|[0-9A-Fa-f]{8})$"
)
# Results Service agent name: letters, digits, hyphens; starts with a letter,
# does not end with a hyphen.
AGENT_PATTERN = r"^[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
# A hostname (RFC 1123), an IPv4/IPv6 address or a CIDR; checked precisely in Python.
HOST_PATTERN = r"^[0-9A-Za-z:.\[\]/_-]{1,253}$"

GROUP_LEVEL_TAGS = {
    "Patient": 0x00100020,  # PatientID
    "Study": 0x0020000D,  # StudyInstanceUID
    "Series": 0x0020000E,  # SeriesInstanceUID
}

PRIORITIES = ("lower", "normal", "higher", "immediate")
Priority = Literal["lower", "normal", "higher", "immediate"]

MIN_TIMEOUT_SECONDS = 5


def parse_group_by(value: str) -> int:
    """Return the DICOM tag (as an int) that a ``groupBy`` value names."""
    if value in GROUP_LEVEL_TAGS:
        return GROUP_LEVEL_TAGS[value]
    if not re.match(GROUP_BY_PATTERN, value):
        raise ValueError(
            f"groupBy {value!r} is not Patient, Study, Series or a tag like 0020,000D, (0020,000D) or 0020000D"
        )
    digits = re.sub(r"[(),]", "", value)
    return int(digits, 16)


def format_tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def check_host(value: str) -> str:
    """Accept an IP address, a CIDR or an RFC 1123 hostname."""
    import ipaddress

    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(value) <= 253 and re.fullmatch(rf"{label}(\.{label})*\.?", value) and not value.replace(".", "").isdigit():
        return value
    raise ValueError(f"host {value!r} is not an IP address, a CIDR or a hostname")


AETitle = Annotated[
    str,
    Field(
        pattern=AE_TITLE_PATTERN,
        min_length=1,
        max_length=16,
        description="DICOM Application Entity title: 1-16 printable ASCII characters, no backslash, "
        "no leading or trailing spaces.",
    ),
]
ObjectName = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=253)]
SopClassUID = Annotated[str, Field(pattern=UID_PATTERN, max_length=64)]


class _Spec(BaseModel):
    """Base of every spec: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False)


# --- specs ------------------------------------------------------------------


class ClaraAETitleSpec(_Spec):
    """An AE title the adapter answers as a DICOM SCP."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "!(has(self.ignoredSopClasses) && size(self.ignoredSopClasses) > 0 && "
            "has(self.allowedSopClasses) && size(self.allowedSopClasses) > 0)",
            "message": "ignoredSopClasses and allowedSopClasses are mutually exclusive: set at most one",
        }
    ]

    aeTitle: AETitle
    processor: ObjectName = Field(
        description="Name of the JobProcessor (same namespace) that turns instances received on this AE title "
        "into pipeline jobs. The AE title is refused until that processor exists and is valid."
    )
    ignoredSopClasses: list[SopClassUID] = Field(
        default_factory=list,
        description="SOP Class UIDs acknowledged with success but dropped. Mutually exclusive with allowedSopClasses.",
    )
    allowedSopClasses: list[SopClassUID] = Field(
        default_factory=list,
        description="If set, only these SOP Class UIDs are kept; others are acknowledged and dropped. "
        "Mutually exclusive with ignoredSopClasses.",
    )
    overwriteSameInstance: bool = Field(
        default=False,
        description="When an instance with a SOP Instance UID already in the open group arrives again: "
        "true replaces the stored file, false (default) drops the duplicate.",
    )
    allowedSources: list[ObjectName] = Field(
        default_factory=list,
        description="Names of ClaraSources allowed to send to this AE title. Empty: any known source.",
    )

    @model_validator(mode="after")
    def _sop_lists_exclusive(self) -> "ClaraAETitleSpec":
        if self.ignoredSopClasses and self.allowedSopClasses:
            raise ValueError(self.cel_rules[0]["message"])
        return self


class JobProcessorSpec(_Spec):
    """How instances received on an AE title are grouped into pipeline jobs."""

    type: str = Field(
        default="aetitle",
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        max_length=63,
        description="Processor plug-in: 'aetitle' (the AE Title Job Processor, default) or the name of an "
        "installed plug-in.",
    )
    groupBy: str = Field(
        default="Study",
        pattern=GROUP_BY_PATTERN,
        description="Group instances by Patient (0010,0020), Study (0020,000D), Series (0020,000E), or by any tag "
        "written as 0020,000D, (0020,000D) or 0020000D. Instances without the tag are ignored.",
    )
    priority: Priority = Field(
        default="normal", description="Priority of the pipeline jobs: lower, normal, higher or immediate."
    )
    timeout: int = Field(
        default=MIN_TIMEOUT_SECONDS,
        ge=MIN_TIMEOUT_SECONDS,
        description="Seconds of quiet after the last acknowledged instance of a group before its jobs are "
        "created (minimum 5).",
    )
    pipelines: dict[Annotated[str, Field(pattern=PIPELINE_KEY_PATTERN)], Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        min_length=1,
        description="Pipelines to run for each group: key (a short name used in job names) -> pipeline ID "
        "(a ClaraPipeline's pipelineId). One PipelineJob per entry.",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form settings for plug-in processor types, checked by the plug-in's validator.",
    )

    @property
    def group_tag(self) -> int:
        return parse_group_by(self.groupBy)


class ClaraSourceSpec(_Spec):
    """A calling DICOM peer allowed to send to the adapter."""

    aeTitle: AETitle
    host: str = Field(
        pattern=HOST_PATTERN, description="The peer's IP address, a CIDR, or a hostname (resolved by the adapter)."
    )

    @field_validator("host")
    @classmethod
    def _host_is_valid(cls, v: str) -> str:
        return check_host(v)


class SecretReference(_Spec):
    name: ObjectName = Field(description="Name of a Secret in the same namespace.")


class DestinationTLS(_Spec):
    secretRef: SecretReference = Field(
        description="Secret holding ca.crt (to verify the destination) and optionally tls.crt/tls.key "
        "(client certificate)."
    )
    serverName: str | None = Field(
        default=None, max_length=253, description="Name to verify the destination's certificate against (default: host)."
    )


class SecretKeyReference(_Spec):
    name: ObjectName = Field(description="Name of a Secret in the same namespace.")
    key: str = Field(default="token", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253,
                     description="Key in that Secret (default: token).")


class DicomWebDestination(_Spec):
    url: str = Field(
        pattern=r"^https?://[^\s/?#]+[^\s?#]*$",
        max_length=2048,
        description="Base URL of the DICOMweb service (e.g. http://orthanc:8042/dicom-web); results are sent with "
        "STOW-RS to <url>/studies.",
    )
    tokenSecretRef: SecretKeyReference | None = Field(
        default=None,
        description="Secret key holding a bearer token sent as 'Authorization: Bearer <token>' (default key: token).",
    )


DESTINATION_KIND_MESSAGE = ("set either aeTitle, host and port (a DICOM C-STORE SCP) or dicomweb (a DICOMweb "
                            "STOW-RS service), not both")


class ClaraDestinationSpec(_Spec):
    """A peer results are exported to: a C-STORE SCP (aeTitle, host, port, tls) or a DICOMweb service (dicomweb)."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "has(self.dicomweb) ? !(has(self.aeTitle) || has(self.host) || has(self.port) || has(self.tls)) "
            ": (has(self.aeTitle) && has(self.host) && has(self.port))",
            "message": DESTINATION_KIND_MESSAGE + "; tls is for C-STORE destinations",
        }
    ]

    aeTitle: AETitle | None = Field(default=None, description="The destination's AE title (C-STORE destinations).")
    host: str | None = Field(default=None, pattern=HOST_PATTERN,
                             description="The destination's hostname or IP address (C-STORE destinations).")
    port: int | None = Field(default=None, ge=1, le=65535,
                             description="The destination's DICOM port (C-STORE destinations).")
    tls: DestinationTLS | None = Field(default=None, description="Use DICOM TLS to reach this destination.")
    dicomweb: DicomWebDestination | None = Field(
        default=None, description="Send results with DICOMweb STOW-RS instead of C-STORE (then aeTitle, host and "
        "port are not set).")

    @field_validator("host")
    @classmethod
    def _host_is_valid(cls, v: str | None) -> str | None:
        return None if v is None else check_host(v)

    @model_validator(mode="after")
    def _one_kind(self) -> "ClaraDestinationSpec":
        dimse = [f for f in ("aeTitle", "host", "port") if getattr(self, f) is not None]
        if self.dicomweb is not None:
            if dimse or self.tls is not None:
                given = ", ".join(dimse + (["tls"] if self.tls is not None else []))
                raise ValueError(f"{DESTINATION_KIND_MESSAGE}: dicomweb is set and so is {given}")
        elif len(dimse) != 3:
            missing = ", ".join(f for f in ("aeTitle", "host", "port") if getattr(self, f) is None)
            raise ValueError(f"{missing} missing: a destination needs aeTitle, host and port (a DICOM C-STORE SCP) "
                             "or dicomweb (a DICOMweb STOW-RS service)")
        return self

    @property
    def label(self) -> str:
        """Where the destination is, for logs and messages (no secrets)."""
        if self.dicomweb is not None:
            return self.dicomweb.url
        return f"{self.aeTitle}@{self.host}:{self.port}" + (" (TLS)" if self.tls is not None else "")


class PipelineContainer(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = Field(min_length=1)
    tag: str | None = None
    command: list[str] | None = None

    @field_validator("tag", mode="before")
    @classmethod
    def _tag_is_text(cls, v: Any) -> Any:
        # Same rule as the CRD (type: string): a YAML number such as 0.10 would
        # silently become "0.1", so numbers must be quoted.
        if v is not None and not isinstance(v, str):
            hint = "quote it" if isinstance(v, (int, float)) else "replace placeholders such as [IMAGE_TAG]"
            raise ValueError(f"tag must be a string (got {v!r}; {hint})")
        return v


class PipelineInput(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    from_: str | None = Field(default=None, alias="from")
    name: str | None = None
    path: str

    @property
    def is_payload(self) -> bool:
        """An input without ``from`` (or with a ``${{…}}`` placeholder) is the job's payload."""
        return self.from_ is None or is_placeholder(self.from_)


class PipelineOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    path: str


class PipelineOperator(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    description: str | None = None
    container: PipelineContainer
    input: list[PipelineInput] = Field(default_factory=list)
    output: list[PipelineOutput] = Field(default_factory=list)
    requests: dict[str, Any] | None = None


def is_placeholder(value: str) -> bool:
    return value.startswith("${{") and value.endswith("}}")


class PipelineDefinition(BaseModel):
    """A Clara pipeline definition (api-version 0.4.0, untyped form). Unknown keys are preserved."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    api_version: str | None = Field(default=None, alias="api-version")
    name: str | None = None
    operators: list[PipelineOperator] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph_is_sound(self) -> "PipelineDefinition":
        self.execution_order()  # raises on duplicates, dangling references, cycles
        return self

    def execution_order(self) -> list[PipelineOperator]:
        """Operators in dependency order (stable: definition order among peers)."""
        by_name: dict[str, PipelineOperator] = {}
        for op in self.operators:
            if op.name in by_name:
                raise ValueError(f"operator names must be unique: {op.name!r} appears twice")
            by_name[op.name] = op
        deps: dict[str, set[str]] = {}
        for op in self.operators:
            deps[op.name] = set()
            for path in [i.path for i in op.input] + [o.path for o in op.output]:
                if not path.startswith("/"):
                    raise ValueError(f"operator {op.name!r}: path {path!r} must be absolute")
            for inp in op.input:
                if inp.is_payload:
                    continue
                source = by_name.get(inp.from_)
                if source is None:
                    raise ValueError(f"operator {op.name!r}: input from {inp.from_!r} names no operator")
                if inp.name is not None and not is_placeholder(inp.name):
                    if inp.name not in {o.name for o in source.output}:
                        raise ValueError(
                            f"operator {op.name!r}: operator {inp.from_!r} has no output named {inp.name!r}"
                        )
                elif inp.name is None and not source.output:
                    raise ValueError(f"operator {op.name!r}: operator {inp.from_!r} has no output")
                if inp.from_ == op.name:
                    raise ValueError(f"operator {op.name!r} takes input from itself")
                deps[op.name].add(inp.from_)
        order: list[PipelineOperator] = []
        done: set[str] = set()
        remaining = [op.name for op in self.operators]
        while remaining:
            ready = [n for n in remaining if deps[n] <= done]
            if not ready:
                raise ValueError(f"operators form a cycle: {', '.join(sorted(remaining))}")
            for n in ready:
                order.append(by_name[n])
                done.add(n)
            remaining = [n for n in remaining if n not in done]
        return order


class ClaraPipelineSpec(_Spec):
    """A pipeline that PipelineJobs run, as a Clara pipeline definition."""

    pipelineId: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="The ID JobProcessors and RegisterResults use to name this pipeline (default: metadata.name).",
    )
    definition: PipelineDefinition = Field(
        description="A Clara pipeline definition: api-version, name, operators[] with container{image,tag,command}, "
        "input[]{from?,name?,path}, output[]{name?,path} and optional requests{gpu,memory,cpu}. "
        "Unknown keys are preserved."
    )


class PipelineJobSource(_Spec):
    aeTitle: str = Field(description="AE title that received the instances.")
    processor: str = Field(description="JobProcessor that created the job.")


class PipelineJobGroup(_Spec):
    by: str = Field(description="Grouping used (Patient, Study, Series or a tag).")
    value: str = Field(description="The group's tag value (may be patient data: never copied to names or labels).")


class PipelineJobPayload(_Spec):
    path: str = Field(description="The job's payload directory (input/ and operators/ beneath it).")
    instances: int = Field(ge=0, description="Number of DICOM instances in the payload.")
    bytes: int = Field(default=0, ge=0, description="Total size of the payload's instances in bytes.")


class PipelineJobSpec(_Spec):
    """A pipeline run over one group of instances. Created by the adapter, run by the operator."""

    pipeline: str = Field(min_length=1, description="Pipeline ID to run.")
    priority: Priority = Field(default="normal", description="lower, normal, higher or immediate.")
    source: PipelineJobSource
    group: PipelineJobGroup
    payload: PipelineJobPayload


class RegisterResultsSpec(_Spec):
    """Registers the outputs of succeeded PipelineJobs of a pipeline with the Results Service."""

    agent: str = Field(
        pattern=AGENT_PATTERN,
        description="Results Service agent that takes the tasks (e.g. ClaraSCU): letters, digits and hyphens, "
        "starting with a letter, not ending with a hyphen.",
    )
    data: list[Any] | None = Field(
        default=None,
        min_length=1,
        description="Each element becomes one task whose parameters are the element's JSON serialisation "
        "(e.g. destination names). Absent: one task with null parameters.",
    )
    pipeline: str = Field(min_length=1, description="Pipeline ID whose succeeded PipelineJobs trigger registration.")
    inputs: list[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/]+)?$")]] = Field(
        default_factory=list,
        description="Outputs to scan, as 'operator' or 'operator/output'. Default: every output of the job.",
    )


# --- resources --------------------------------------------------------------


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class Resource(BaseModel):
    """Common shape of every custom resource."""

    model_config = ConfigDict(extra="allow")
    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[list[str]]
    PRINTER_COLUMNS: ClassVar[list[dict[str, str]]]
    DESCRIPTION: ClassVar[str]

    apiVersion: Literal["dicom.clara.io/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta
    status: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.KIND, self.metadata.namespace, self.metadata.name)

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


_READY = {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


class ClaraAETitle(Resource):
    KIND = "ClaraAETitle"
    PLURAL = "claraaetitles"
    SHORT_NAMES = ["aet"]
    DESCRIPTION = "An AE title the DICOM adapter answers, and the JobProcessor that handles what it receives."
    PRINTER_COLUMNS = [
        _READY,
        {"name": "AE Title", "type": "string", "jsonPath": ".spec.aeTitle"},
        {"name": "Processor", "type": "string", "jsonPath": ".spec.processor"},
        _AGE,
    ]
    kind: Literal["ClaraAETitle"] = "ClaraAETitle"
    spec: ClaraAETitleSpec


class JobProcessor(Resource):
    KIND = "JobProcessor"
    PLURAL = "jobprocessors"
    SHORT_NAMES = ["jp"]
    DESCRIPTION = "Groups received instances (by Patient, Study, Series or a tag) into PipelineJobs."
    PRINTER_COLUMNS = [
        _READY,
        {"name": "Group By", "type": "string", "jsonPath": ".spec.groupBy"},
        {"name": "Priority", "type": "string", "jsonPath": ".spec.priority"},
        {"name": "Timeout", "type": "integer", "jsonPath": ".spec.timeout"},
        {"name": "Pipelines", "type": "string", "jsonPath": ".status.pipelines"},
    ]
    kind: Literal["JobProcessor"] = "JobProcessor"
    spec: JobProcessorSpec


class ClaraSource(Resource):
    KIND = "ClaraSource"
    PLURAL = "clarasources"
    SHORT_NAMES = ["src"]
    DESCRIPTION = "A calling DICOM peer (AE title and host) allowed to send to the adapter."
    PRINTER_COLUMNS = [
        {"name": "AE Title", "type": "string", "jsonPath": ".spec.aeTitle"},
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        _AGE,
    ]
    kind: Literal["ClaraSource"] = "ClaraSource"
    spec: ClaraSourceSpec


class ClaraDestination(Resource):
    KIND = "ClaraDestination"
    PLURAL = "claradestinations"
    SHORT_NAMES = ["dst"]
    DESCRIPTION = "A DICOM peer (C-STORE SCP or DICOMweb service) that results are exported to."
    PRINTER_COLUMNS = [
        {"name": "AE Title", "type": "string", "jsonPath": ".spec.aeTitle"},
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        {"name": "Port", "type": "integer", "jsonPath": ".spec.port"},
        {"name": "DICOMweb", "type": "string", "jsonPath": ".spec.dicomweb.url", "priority": 1},
        _AGE,
    ]
    kind: Literal["ClaraDestination"] = "ClaraDestination"
    spec: ClaraDestinationSpec


class ClaraPipeline(Resource):
    KIND = "ClaraPipeline"
    PLURAL = "clarapipelines"
    SHORT_NAMES = ["pipe"]
    DESCRIPTION = "A Clara pipeline definition that PipelineJobs run as Kubernetes Jobs."
    PRINTER_COLUMNS = [
        _READY,
        {"name": "Pipeline ID", "type": "string", "jsonPath": ".status.pipelineId"},
        _AGE,
    ]
    kind: Literal["ClaraPipeline"] = "ClaraPipeline"
    spec: ClaraPipelineSpec

    @property
    def pipeline_id(self) -> str:
        return self.spec.pipelineId or self.metadata.name


class PipelineJob(Resource):
    KIND = "PipelineJob"
    PLURAL = "pipelinejobs"
    SHORT_NAMES = ["pjob"]
    DESCRIPTION = "One pipeline run over one group of received instances."
    PRINTER_COLUMNS = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Pipeline", "type": "string", "jsonPath": ".spec.pipeline"},
        {"name": "Priority", "type": "string", "jsonPath": ".spec.priority"},
        {"name": "Instances", "type": "integer", "jsonPath": ".spec.payload.instances"},
        _AGE,
    ]
    kind: Literal["PipelineJob"] = "PipelineJob"
    spec: PipelineJobSpec


class RegisterResults(Resource):
    KIND = "RegisterResults"
    PLURAL = "registerresults"
    SHORT_NAMES = ["rr"]
    DESCRIPTION = "Registers outputs of succeeded PipelineJobs with the Results Service for an agent."
    PRINTER_COLUMNS = [
        _READY,
        {"name": "Pipeline", "type": "string", "jsonPath": ".spec.pipeline"},
        {"name": "Agent", "type": "string", "jsonPath": ".spec.agent"},
        {"name": "Runs", "type": "integer", "jsonPath": ".status.runs"},
        _AGE,
    ]
    kind: Literal["RegisterResults"] = "RegisterResults"
    spec: RegisterResultsSpec


RESOURCE_TYPES: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (ClaraAETitle, JobProcessor, ClaraSource, ClaraDestination, ClaraPipeline, PipelineJob, RegisterResults)
}
