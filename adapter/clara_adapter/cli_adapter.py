"""`clara-dicom adapter`: the adapter in Kubernetes mode."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    # No defaults here: a flag not given leaves the environment, the settings file, then the
    # default to decide (clara_adapter.settings.AdapterSettings; docs/reference.md).
    p.add_argument("--namespace", help="namespace of the resources (default: the pod's namespace, else 'default'; "
                                       "env CLARA_NAMESPACE)")
    p.add_argument("--config-map", metavar="NAME",
                   help="ConfigMap the operator renders (default clara-dicom-adapter-config; env CLARA_CONFIG_MAP)")
    p.add_argument("--status-config-map", metavar="NAME",
                   help="ConfigMap where the applied configuration version is published "
                        "(default clara-dicom-adapter-status; env CLARA_STATUS_CONFIG_MAP)")
    p.add_argument("--storage", metavar="DIR", help="storage root: incoming files, payloads, journal")
    p.add_argument("--dicom-port", type=int, metavar="N", help="DICOM port (default 11112)")
    p.add_argument("--http-port", type=int, metavar="N", help="health/metrics port (default 8080)")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--settings", metavar="FILE", help="adapter settings file (YAML)")
    p.add_argument("--journal", metavar="DSN",
                   help="journal: a postgresql:// DSN, or a SQLite file (default: STORAGE/journal.sqlite)")
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: $KUBECONFIG, else in-cluster)")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from clara_adapter.k8s import KubeBridge
    from clara_adapter.service import Adapter, run_until_signalled
    from clara_adapter.settings import load_settings

    log = logging.getLogger("clara_adapter")
    settings = load_settings(args.settings, overrides={"storageDir": args.storage, "dicomPort": args.dicom_port,
                                                        "httpPort": args.http_port, "host": args.host,
                                                        "journal": args.journal, "namespace": args.namespace,
                                                        "configMap": args.config_map,
                                                        "statusConfigMap": args.status_config_map})
    namespace = settings.namespace or _pod_namespace() or "default"
    Path(settings.storageDir).mkdir(parents=True, exist_ok=True)
    bridge = KubeBridge(namespace, settings.configMap, settings.statusConfigMap,
                        Path(settings.storageDir) / "applied-config.json", args.kubeconfig)
    adapter = Adapter(settings, bridge, namespace=namespace)
    adapter.applied_listeners.append(bridge.publish)  # appliedVersion follows what is applied, in order
    # Configurations the watch delivers while the adapter starts are kept (newest wins) and applied
    # after recovery; `initial` was read before them.
    initial = bridge.start(adapter.apply_config)
    adapter.start(initial)
    if initial is None:
        log.warning("no configuration yet: every association is refused until the operator renders one")

    def stop() -> None:
        adapter.stop()
        bridge.stop()

    run_until_signalled(stop)
    return 0


def _pod_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None
