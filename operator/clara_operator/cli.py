"""`clara-dicom operator`: the kopf operator (SPEC §5, §7).

Standard library only at top level (the CLI builds its parser fast); kopf and
kubernetes_asyncio are imported in ``run``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="watch this namespace (default: the current one)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--config-map", default="clara-dicom-adapter-config",
                        help="name of the rendered adapter ConfigMap (default %(default)s)")
    parser.add_argument("--status-config-map", default="clara-dicom-adapter-status",
                        help="ConfigMap where the adapter publishes appliedVersion (default %(default)s)")
    parser.add_argument("--no-adapter-feedback", action="store_true",
                        help="mark objects Ready without waiting for the adapter to apply the configuration")
    parser.add_argument("--liveness-port", type=int, default=8081,
                        help="port of the liveness endpoint http://127.0.0.1:PORT/healthz (0: off; default %(default)s)")
    parser.add_argument("--liveness-host", default="127.0.0.1", help="address of the liveness endpoint")
    parser.add_argument("--resync-seconds", type=float, default=30.0, metavar="S",
                        help="re-check every PipelineJob and RegisterResults against their Jobs every S seconds "
                             "(default %(default)s)")
    parser.add_argument("--workers", type=int, default=32, metavar="N",
                        help="PipelineJob/RegisterResults reconciles in flight (default %(default)s)")
    add_runner_arguments(parser)


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """How PipelineJobs run as batch Jobs (operator/PIPELINES.md)."""
    g = parser.add_argument_group("pipeline jobs (operator/PIPELINES.md)")
    g.add_argument("--payload-pvc", default="clara-dicom-payloads", metavar="NAME",
                   help="PersistentVolumeClaim holding the adapter's payloads, mounted in pipeline pods "
                        "(default %(default)s)")
    g.add_argument("--payload-host-path", default=None, metavar="DIR",
                   help="instead of the PVC: this node directory is the payload volume (single-node clusters)")
    g.add_argument("--payload-root", default="/var/lib/clara-dicom", metavar="DIR",
                   help="where the adapter sees the payload volume's root; spec.payload.path lies under it "
                        "(default %(default)s)")
    g.add_argument("--prepare-image", default=os.environ.get("CLARA_DICOM_IMAGE", "clara-dicom:latest"),
                   metavar="IMAGE", help="image of the init container that creates the output folders "
                                         "(default: $CLARA_DICOM_IMAGE or clara-dicom:latest)")
    g.add_argument("--register-image", default=None, metavar="IMAGE",
                   help="image of RegisterResults Jobs, which run register-results (default: --prepare-image)")
    g.add_argument("--results-url", default=os.environ.get("CLARA_RESULTS_URL"), metavar="URL",
                   help="CLARA_RESULTS_URL for pipeline containers (default: $CLARA_RESULTS_URL)")
    g.add_argument("--results-token-secret", default=None, metavar="NAME",
                   help="Secret whose key (--results-token-key) becomes CLARA_RESULTS_TOKEN in pipeline containers")
    g.add_argument("--results-token-key", default="token", metavar="KEY", help="key in that Secret (default token)")
    g.add_argument("--image-pull-secret", action="append", default=[], metavar="NAME",
                   help="imagePullSecret for pipeline pods (repeatable)")
    g.add_argument("--toleration", action="append", default=[], type=_json_object, metavar="JSON",
                   help='toleration for pipeline pods, e.g. \'{"key":"nvidia.com/gpu","operator":"Exists",'
                        '"effect":"NoSchedule"}\' (repeatable)')
    g.add_argument("--node-selector", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="nodeSelector entry for pipeline pods (repeatable)")
    g.add_argument("--pod-annotation", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="annotation on pipeline pods, e.g. sidecar.istio.io/inject=false (repeatable)")
    g.add_argument("--fs-group", type=int, default=None, metavar="GID",
                   help="pod fsGroup, so non-root pipeline images can read the payload")
    g.add_argument("--run-as-user", type=int, default=None, metavar="UID", help="pod runAsUser")
    g.add_argument("--run-as-non-root", action="store_true", help="pod runAsNonRoot")
    g.add_argument("--pipeline-service-account", default=None, metavar="NAME",
                   help="ServiceAccount of pipeline pods (default: the namespace's default; no token mounted)")
    g.add_argument("--active-deadline-seconds", type=int, default=600, metavar="S",
                   help="activeDeadlineSeconds of pipeline Jobs (default %(default)s)")
    g.add_argument("--priority-class-prefix", default="clara-dicom-", metavar="PREFIX",
                   help="PriorityClass of a job = PREFIX + priority (lower|normal|higher|immediate; "
                        "default %(default)s)")
    g.add_argument("--job-retention-hours", type=float, default=24.0, metavar="H",
                   help="delete finished PipelineJobs (and their Jobs and pods) after H hours (0: never; "
                        "default %(default)s)")


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


def runner_settings(args: argparse.Namespace) -> Any:
    from clara_operator.jobspec import RunnerSettings

    return RunnerSettings(
        payload_root=args.payload_root, payload_pvc=args.payload_pvc or None,
        payload_host_path=args.payload_host_path, prepare_image=args.prepare_image,
        register_image=args.register_image,
        results_url=args.results_url or None, results_token_secret=args.results_token_secret,
        results_token_key=args.results_token_key, image_pull_secrets=list(args.image_pull_secret),
        tolerations=list(args.toleration), node_selector=dict(args.node_selector),
        pod_annotations=dict(args.pod_annotation), fs_group=args.fs_group,
        run_as_user=args.run_as_user, run_as_non_root=args.run_as_non_root,
        service_account=args.pipeline_service_account, active_deadline_seconds=args.active_deadline_seconds,
        priority_class_prefix=args.priority_class_prefix, retention_hours=args.job_retention_hours)


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
        return client.ApiClient(_pooled(client, pool_size)), namespace
    try:
        await config.load_kube_config()
        _, active = config.list_kube_config_contexts()
    except Exception as exc:  # noqa: BLE001 - any kubeconfig problem is the user's to fix
        raise UserError(f"no Kubernetes credentials (in-cluster or kubeconfig {os.environ.get('KUBECONFIG', '~/.kube/config')}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
    return client.ApiClient(_pooled(client, pool_size)), namespace


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

    import kopf

    from clara_operator import handlers

    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        # kopf logs every handler call at INFO; our reconcile logs what matters.
        for name in ("kopf.objects", "kopf.activities.probe", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from clara_operator.reconciler import Api, Options

    # One connection per reconcile in flight, plus the namespace reconciles.
    api_client, current_namespace = await _api_client(pool_size=args.workers + 8)
    try:
        await preflight(api_client)
        settings = kopf.OperatorSettings()
        handlers.configure(settings)
        memo = kopf.Memo()
        memo.api = Api(api_client)
        memo.options = Options(config_map=args.config_map, status_config_map=args.status_config_map,
                               feedback=not args.no_adapter_feedback)
        memo.reconcilers = {}
        from clara_operator.controller import Controller
        from clara_operator.kube import Kube

        memo.controller = Controller(Kube(api_client), runner_settings(args), workers=args.workers,
                                     namespaces=None if args.all_namespaces else [args.namespace or current_namespace],
                                     resync_seconds=args.resync_seconds)
        liveness = (f"http://{args.liveness_host}:{args.liveness_port}/healthz"
                    if args.liveness_port else None)
        scope: dict[str, Any]
        if args.all_namespaces:
            scope = {"clusterwide": True}
        else:
            scope = {"namespaces": [args.namespace or current_namespace]}
        await kopf.operator(registry=handlers.registry, settings=settings, memo=memo, standalone=True,
                            liveness_endpoint=liveness, **scope)
    finally:
        await api_client.close()
    return 0
