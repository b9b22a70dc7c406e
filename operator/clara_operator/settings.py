"""Settings of the operator (``clara-dicom operator``): defaults, types, limits and
environment names (convention and precedence: :mod:`clara_dicom.settings`).
How pipeline Jobs are built from them: operator/PIPELINES.md."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from clara_dicom import DEFAULT_IMAGE
from clara_dicom.settings import ComponentSettings


class OperatorSettings(ComponentSettings):
    component: ClassVar[str] = "operator (clara-dicom operator)"
    flags: ClassVar[dict[str, str]] = {
        "namespace": "-n, --namespace", "allNamespaces": "-A, --all-namespaces", "configMap": "--config-map",
        "statusConfigMap": "--status-config-map", "adapterFeedback": "--no-adapter-feedback",
        "livenessPort": "--liveness-port", "livenessHost": "--liveness-host", "resyncSeconds": "--resync-seconds",
        "reconcileWorkers": "--workers", "payloadPvc": "--payload-pvc", "payloadHostPath": "--payload-host-path",
        "payloadVolumeRoot": "--payload-root", "prepareImage": "--prepare-image", "registerImage": "--register-image",
        "resultsUrl": "--results-url", "resultsTokenSecret": "--results-token-secret",
        "resultsTokenKey": "--results-token-key", "imagePullSecrets": "--image-pull-secret",
        "tolerations": "--toleration", "nodeSelector": "--node-selector", "podAnnotations": "--pod-annotation",
        "fsGroup": "--fs-group", "runAsUser": "--run-as-user", "runAsNonRoot": "--run-as-non-root",
        "pipelineServiceAccount": "--pipeline-service-account",
        "activeDeadlineSeconds": "--active-deadline-seconds", "priorityClassPrefix": "--priority-class-prefix",
        "jobRetentionHours": "--job-retention-hours"}

    namespace: str | None = Field(None, description="Namespace whose resources are watched (default: the current "
                                  "one: the pod's, else the kubeconfig context's).")
    allNamespaces: bool = Field(False, description="Watch every namespace.")
    configMap: str = Field("clara-dicom-adapter-config", min_length=1,
                           description="ConfigMap the operator renders for the adapter.")
    statusConfigMap: str = Field("clara-dicom-adapter-status", min_length=1,
                                 description="ConfigMap where the adapter publishes appliedVersion.")
    adapterFeedback: bool = Field(True, description="Wait for the adapter to apply a configuration before marking "
                                  "objects Ready (false: --no-adapter-feedback).")
    livenessPort: int = Field(8081, ge=0, le=65535, description="Port of the liveness endpoint "
                              "http://HOST:PORT/healthz (0: off).")
    livenessHost: str = Field("127.0.0.1", description="Address of the liveness endpoint.")
    resyncSeconds: float = Field(30.0, gt=0, description="Re-check every PipelineJob and RegisterResults against "
                                 "their Jobs this often.")
    reconcileWorkers: int = Field(32, ge=1, le=1000, description="PipelineJob/RegisterResults reconciles in flight.")
    payloadPvc: str = Field("clara-dicom-payloads", description="PersistentVolumeClaim holding the adapter's "
                            "payloads, mounted in pipeline pods (empty: none).")
    payloadHostPath: str | None = Field(None, description="Instead of the PVC: this node directory is the payload "
                                        "volume (single-node clusters).")
    payloadVolumeRoot: str = Field("/var/lib/clara-dicom", min_length=1, description="Where the adapter sees the "
                                   "payload volume's root; spec.payload.path lies under it.")
    prepareImage: str = Field(DEFAULT_IMAGE, min_length=1, description="Image of the init container that "
                              "creates the output folders.")
    registerImage: str | None = Field(None, description="Image of RegisterResults Jobs, which run register-results "
                                      "(default: prepareImage).")
    resultsUrl: str | None = Field(None, description="Results Service URL (the operator hands it to pipeline "
                                   "containers as CLARA_RESULTS_URL).")
    resultsTokenSecret: str | None = Field(None, description="Secret whose key resultsTokenKey becomes "
                                           "CLARA_RESULTS_TOKEN in pipeline containers.")
    resultsTokenKey: str = Field("token", min_length=1, description="Key in that Secret.")
    imagePullSecrets: list[str] = Field(default_factory=list, description="imagePullSecrets of pipeline pods "
                                        "(environment: a JSON array).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of pipeline pods "
                                              "(environment: a JSON array of objects).")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of pipeline pods "
                                         "(flag KEY=VALUE, repeatable; environment: a JSON object).")
    podAnnotations: dict[str, str] = Field(default_factory=dict, description="Annotations on pipeline pods, e.g. "
                                           "sidecar.istio.io/inject=false (environment: a JSON object).")
    fsGroup: int | None = Field(None, ge=0, description="Pod fsGroup, so non-root pipeline images can read the "
                                "payload.")
    runAsUser: int | None = Field(None, ge=0, description="Pod runAsUser.")
    runAsNonRoot: bool = Field(False, description="Pod runAsNonRoot.")
    pipelineServiceAccount: str | None = Field(None, description="ServiceAccount of pipeline pods (default: the "
                                               "namespace's default; no token mounted).")
    activeDeadlineSeconds: int = Field(600, ge=1, description="activeDeadlineSeconds of pipeline Jobs.")
    priorityClassPrefix: str = Field("clara-dicom-", description="PriorityClass of a job = prefix + priority "
                                     "(lower|normal|higher|immediate).")
    jobRetentionHours: float = Field(24.0, ge=0, description="Delete finished PipelineJobs (and their Jobs and "
                                     "pods) after this many hours (0: never).")

    @model_validator(mode="after")
    def _one_scope(self) -> "OperatorSettings":
        if self.namespace and self.allNamespaces:
            raise ValueError("namespace and allNamespaces exclude each other (CLARA_NAMESPACE, "
                             "CLARA_ALL_NAMESPACES, -n, -A)")
        return self
