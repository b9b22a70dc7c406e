"""`clara-dicom operator`: the kopf operator (SPEC §5, §7).

Standard library only at top level (the CLI builds its parser fast); kopf and
kubernetes_asyncio are imported in ``run``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from clara_dicom import DEFAULT_IMAGE

IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No defaults here: a flag not given leaves the environment, then the default, to decide
    # (clara_operator.settings.OperatorSettings: defaults, limits and environment names).
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="watch this namespace (default: the current one; "
                                                  "env CLARA_NAMESPACE)")
    scope.add_argument("-A", "--all-namespaces", action="store_const", const=True, default=None,
                       help="watch every namespace (env CLARA_ALL_NAMESPACES)")
    parser.add_argument("--config-map", help="name of the rendered adapter ConfigMap "
                                             "(default clara-dicom-adapter-config; env CLARA_CONFIG_MAP)")
    parser.add_argument("--status-config-map",
                        help="ConfigMap where the adapter publishes appliedVersion (default clara-dicom-adapter-status; "
                             "env CLARA_STATUS_CONFIG_MAP)")
    parser.add_argument("--no-adapter-feedback", dest="adapter_feedback", action="store_const", const=False,
                        default=None, help="mark objects Ready without waiting for the adapter to apply the "
                                           "configuration (env CLARA_ADAPTER_FEEDBACK=false)")
    parser.add_argument("--liveness-port", metavar="PORT",
                        help="port of the liveness endpoint http://127.0.0.1:PORT/healthz (0: off; default 8081; "
                             "env CLARA_LIVENESS_PORT)")
    parser.add_argument("--liveness-host", help="address of the liveness endpoint (default 127.0.0.1; "
                                                "env CLARA_LIVENESS_HOST)")
    parser.add_argument("--resync-seconds", metavar="S",
                        help="re-check every PipelineJob and RegisterResults against their Jobs every S seconds "
                             "(default 30; env CLARA_RESYNC_SECONDS)")
    parser.add_argument("--workers", metavar="N",
                        help="PipelineJob/RegisterResults reconciles in flight (default 32; "
                             "env CLARA_RECONCILE_WORKERS)")
    add_runner_arguments(parser)


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """How PipelineJobs run as batch Jobs (operator/PIPELINES.md)."""
    g = parser.add_argument_group("pipeline jobs (operator/PIPELINES.md; every flag also has an environment "
                                  "variable: docs/reference.md)")
    g.add_argument("--payload-pvc", metavar="NAME",
                   help="PersistentVolumeClaim holding the adapter's payloads, mounted in pipeline pods "
                        "(default clara-dicom-payloads)")
    g.add_argument("--payload-host-path", metavar="DIR",
                   help="instead of the PVC: this node directory is the payload volume (single-node clusters)")
    g.add_argument("--payload-root", metavar="DIR",
                   help="where the adapter sees the payload volume's root; spec.payload.path lies under it "
                        "(default /var/lib/clara-dicom; env CLARA_PAYLOAD_VOLUME_ROOT)")
    g.add_argument("--prepare-image", metavar="IMAGE",
                   help="image of the init container that creates the output folders "
                        f"(default {DEFAULT_IMAGE}; env CLARA_PREPARE_IMAGE)")
    g.add_argument("--register-image", metavar="IMAGE",
                   help="image of RegisterResults Jobs, which run register-results (default: --prepare-image)")
    g.add_argument("--results-url", metavar="URL",
                   help="CLARA_RESULTS_URL for pipeline containers (default: $CLARA_RESULTS_URL)")
    g.add_argument("--results-token-secret", metavar="NAME",
                   help="Secret whose key (--results-token-key) becomes CLARA_RESULTS_TOKEN in pipeline containers")
    g.add_argument("--results-token-key", metavar="KEY", help="key in that Secret (default token)")
    g.add_argument("--image-pull-secret", action="append", metavar="NAME",
                   help="imagePullSecret for pipeline pods (repeatable)")
    g.add_argument("--toleration", action="append", type=_json_object, metavar="JSON",
                   help='toleration for pipeline pods, e.g. \'{"key":"nvidia.com/gpu","operator":"Exists",'
                        '"effect":"NoSchedule"}\' (repeatable)')
    g.add_argument("--node-selector", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="nodeSelector entry for pipeline pods (repeatable)")
    g.add_argument("--pod-annotation", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="annotation on pipeline pods, e.g. sidecar.istio.io/inject=false (repeatable)")
    g.add_argument("--fs-group", metavar="GID",
                   help="pod fsGroup, so non-root pipeline images can read the payload")
    g.add_argument("--run-as-user", metavar="UID", help="pod runAsUser")
    g.add_argument("--run-as-non-root", action="store_const", const=True, default=None, help="pod runAsNonRoot")
    g.add_argument("--pipeline-service-account", metavar="NAME",
                   help="ServiceAccount of pipeline pods (default: the namespace's default; no token mounted)")
    g.add_argument("--active-deadline-seconds", metavar="S",
                   help="activeDeadlineSeconds of pipeline Jobs (default 600)")
    g.add_argument("--priority-class-prefix", metavar="PREFIX",
                   help="PriorityClass of a job = PREFIX + priority (lower|normal|higher|immediate; "
                        "default clara-dicom-)")
    g.add_argument("--job-retention-hours", metavar="H",
                   help="delete finished PipelineJobs (and their Jobs and pods) after H hours (0: never; "
                        "default 24)")


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def load(args: argparse.Namespace) -> Any:
    """The operator's settings: flags > environment > defaults (OperatorSettings)."""
    from clara_operator.settings import OperatorSettings

    def pairs(values: list | None) -> dict | None:
        return None if values is None else dict(values)

    get = lambda name: getattr(args, name, None)  # noqa: E731 - parsers built by add_runner_arguments alone
    scope: dict[str, Any] = {}
    if get("all_namespaces"):  # a flag beats CLARA_NAMESPACE in the environment
        scope = {"allNamespaces": True, "namespace": ""}
    elif get("namespace"):
        scope = {"allNamespaces": False, "namespace": get("namespace")}
    return OperatorSettings.load(flags={
        **scope, "configMap": get("config_map"), "statusConfigMap": get("status_config_map"),
        "adapterFeedback": get("adapter_feedback"), "livenessPort": get("liveness_port"),
        "livenessHost": get("liveness_host"), "resyncSeconds": get("resync_seconds"),
        "reconcileWorkers": get("workers"), "payloadPvc": get("payload_pvc"),
        "payloadHostPath": get("payload_host_path"), "payloadVolumeRoot": get("payload_root"),
        "prepareImage": get("prepare_image"), "registerImage": get("register_image"),
        "resultsUrl": get("results_url"), "resultsTokenSecret": get("results_token_secret"),
        "resultsTokenKey": get("results_token_key"), "imagePullSecrets": get("image_pull_secret"),
        "tolerations": get("toleration"), "nodeSelector": pairs(get("node_selector")),
        "podAnnotations": pairs(get("pod_annotation")), "fsGroup": get("fs_group"),
        "runAsUser": get("run_as_user"), "runAsNonRoot": get("run_as_non_root"),
        "pipelineServiceAccount": get("pipeline_service_account"),
        "activeDeadlineSeconds": get("active_deadline_seconds"),
        "priorityClassPrefix": get("priority_class_prefix"), "jobRetentionHours": get("job_retention_hours")})


def runner_settings(args: argparse.Namespace, settings: Any = None) -> Any:
    from clara_operator.jobspec import RunnerSettings

    s = settings if settings is not None else load(args)
    return RunnerSettings(
        payload_root=s.payloadVolumeRoot, payload_pvc=s.payloadPvc or None,
        payload_host_path=s.payloadHostPath, prepare_image=s.prepareImage,
        register_image=s.registerImage,
        results_url=s.resultsUrl or None, results_token_secret=s.resultsTokenSecret,
        results_token_key=s.resultsTokenKey, image_pull_secrets=list(s.imagePullSecrets),
        tolerations=list(s.tolerations), node_selector=dict(s.nodeSelector),
        pod_annotations=dict(s.podAnnotations), fs_group=s.fsGroup,
        run_as_user=s.runAsUser, run_as_non_root=s.runAsNonRoot,
        service_account=s.pipelineServiceAccount, active_deadline_seconds=s.activeDeadlineSeconds,
        priority_class_prefix=s.priorityClassPrefix, retention_hours=s.jobRetentionHours)


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_main(args))


async def _api_client(pool_size: int = 0) -> tuple[Any, str]:
    """An API client from in-cluster credentials or the kubeconfig, and the current namespace;
    ``pool_size`` connections at most (default: kubernetes_asyncio's, 5 × CPUs)."""
    from kubernetes_asyncio import client, config

    from clara_dicom.errors import UserError

    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(IN_CLUSTER_NAMESPACE):
        config.load_incluster_config()
        with open(IN_CLUSTER_NAMESPACE, encoding="utf-8") as fh:
            namespace = fh.read().strip() or "default"
        return _direct(client.ApiClient(_pooled(client, pool_size))), namespace
    try:
        await config.load_kube_config()
        _, active = config.list_kube_config_contexts()
    except Exception as exc:  # noqa: BLE001 - any kubeconfig problem is the user's to fix
        raise UserError(f"no Kubernetes credentials (in-cluster or kubeconfig {os.environ.get('KUBECONFIG', '~/.kube/config')}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
    return _direct(client.ApiClient(_pooled(client, pool_size))), namespace


PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "http_proxy", "HTTP_PROXY")


def _direct(api_client: Any) -> Any:
    """The client without aiohttp's per-request environment lookups, unless a proxy is configured.

    kubernetes_asyncio opens its session with ``trust_env=True``: every request then reads
    ~/.netrc and the proxy variables in the default thread pool (two thread hops per request;
    under load the pool's queue was a wait of its own in front of every API call). The API
    server never takes netrc credentials; a proxy in the environment keeps the old behaviour."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return api_client
    session = api_client.rest_client.pool_manager
    session._trust_env = False  # aiohttp has no setter; the attribute is read per request
    return api_client


def _pooled(client: Any, pool_size: int) -> Any:
    configuration = client.Configuration.get_default_copy()
    if pool_size:
        configuration.connection_pool_maxsize = pool_size
    return configuration


async def preflight(api_client: Any) -> None:
    """A one-line error when the API is unreachable or the CRDs are missing."""
    import asyncio

    from kubernetes_asyncio import client

    from clara_dicom.errors import UserError
    from clara_dicom.models import GROUP

    host = api_client.configuration.host
    try:
        groups = await asyncio.wait_for(client.ApisApi(api_client).get_api_versions(), 10)
    except Exception as exc:  # noqa: BLE001
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot reach the Kubernetes API at {host}: {detail}") from None
    if not any(g.name == GROUP for g in groups.groups or []):
        raise UserError(f"the {GROUP} CustomResourceDefinitions are not installed in {host}: "
                        "kubectl apply -f crds/")


async def _main(args: argparse.Namespace) -> int:
    import logging

    options = load(args)

    import kopf

    from clara_operator import handlers

    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        # kopf logs every handler call at INFO; our reconcile logs what matters.
        for name in ("kopf.objects", "kopf.activities.probe", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from clara_operator.reconciler import Api, Options

    from clara_operator.events import EVENT_POSTERS

    # One connection per reconcile in flight, per Event poster and per watch (two per namespace,
    # held for as long as they stream), plus the namespace reconciles: a create never waits for a
    # connection an Event holds.
    api_client, current_namespace = await _api_client(pool_size=options.reconcileWorkers + EVENT_POSTERS + 2 + 8)
    try:
        await preflight(api_client)
        settings = kopf.OperatorSettings()
        handlers.configure(settings)
        memo = kopf.Memo()
        memo.api = Api(api_client)
        memo.options = Options(config_map=options.configMap, status_config_map=options.statusConfigMap,
                               feedback=options.adapterFeedback)
        memo.reconcilers = {}
        from clara_operator.controller import Controller
        from clara_operator.kube import Kube

        namespace = options.namespace or current_namespace
        memo.controller = Controller(Kube(api_client), runner_settings(args, options),
                                     workers=options.reconcileWorkers,
                                     namespaces=None if options.allNamespaces else [namespace],
                                     resync_seconds=options.resyncSeconds)
        liveness = (f"http://{options.livenessHost}:{options.livenessPort}/healthz"
                    if options.livenessPort else None)
        scope: dict[str, Any]
        if options.allNamespaces:
            scope = {"clusterwide": True}
        else:
            scope = {"namespaces": [namespace]}
        await kopf.operator(registry=handlers.registry, settings=settings, memo=memo, standalone=True,
                            liveness_endpoint=liveness, **scope)
    finally:
        await api_client.close()
    return 0
