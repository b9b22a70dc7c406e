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


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_main(args))


async def _api_client() -> tuple[Any, str]:
    """An API client from in-cluster credentials or the kubeconfig, and the current namespace."""
    from kubernetes_asyncio import client, config

    from clara_dicom.errors import UserError

    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(IN_CLUSTER_NAMESPACE):
        config.load_incluster_config()
        with open(IN_CLUSTER_NAMESPACE, encoding="utf-8") as fh:
            namespace = fh.read().strip() or "default"
        return client.ApiClient(), namespace
    try:
        await config.load_kube_config()
        _, active = config.list_kube_config_contexts()
    except Exception as exc:  # noqa: BLE001 - any kubeconfig problem is the user's to fix
        raise UserError(f"no Kubernetes credentials (in-cluster or kubeconfig {os.environ.get('KUBECONFIG', '~/.kube/config')}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
    return client.ApiClient(), namespace


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

    api_client, current_namespace = await _api_client()
    try:
        await preflight(api_client)
        settings = kopf.OperatorSettings()
        handlers.configure(settings)
        memo = kopf.Memo()
        memo.api = Api(api_client)
        memo.options = Options(config_map=args.config_map, status_config_map=args.status_config_map,
                               feedback=not args.no_adapter_feedback)
        memo.reconcilers = {}
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
