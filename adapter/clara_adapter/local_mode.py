"""Local mode: one process running the adapter, the Results Service and a local
job sink, configured from manifest files (no cluster needed)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clara_dicom.errors import UserError

from clara_adapter.jobs import LocalJobSink
from clara_adapter.local_config import LocalConfigSource
from clara_adapter.service import Adapter, run_until_signalled
from clara_adapter.settings import load_settings

log = logging.getLogger(__name__)


def run_local(args: argparse.Namespace) -> int:
    state = Path(args.state).resolve()
    overrides = {"storageDir": str(state), "host": args.host, "dicomPort": args.dicom_port,
                 "httpPort": args.http_port, "journal": getattr(args, "journal", None),
                 "receiveWorkers": getattr(args, "receive_workers", None)}
    settings = load_settings(args.settings, overrides=overrides)
    source = LocalConfigSource(args.config)
    config = source.load()  # a broken configuration at start is a one-line error
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"state folder {state}: {exc.strerror}") from None
    adapter = Adapter(settings, LocalJobSink(state / "jobs"))
    stoppers = []
    adapter.start(config)
    stoppers.append(adapter.stop)
    results = _start_results_service(args, settings, state)
    if results is not None:
        stoppers.insert(0, results.stop)
        adapter.extra_status.append(lambda: {"resultsService": results.url})
        if adapter.export is None:  # no resultsUrl setting: export from the in-process service
            adapter.start_export(results.url, results.token)
        if adapter.export is not None:  # report the last outcomes before the service stops
            stoppers.insert(0, adapter.export.stop)

    def tick() -> None:
        new = source.poll()
        if new is not None:
            adapter.apply_config(new)

    def stop() -> None:
        for fn in stoppers:
            fn()

    run_until_signalled(stop, tick, interval=0.5)
    return 0


def _start_results_service(args: argparse.Namespace, settings, state: Path):
    port = args.results_port if args.results_port is not None else (settings.httpPort + 1 if settings.httpPort else 0)
    if not port:
        return None
    try:
        from clara_results.server import ResultsServer
    except ImportError:
        log.warning("Results Service not available in this build")
        return None
    import secrets

    token_file = state / "results-token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
    token = token_file.read_text().strip()
    server = ResultsServer(host=args.host, port=port, database=str(state / "results.sqlite"), token=token)
    server.start()
    log.info("Results Service on %s (token in %s)", server.url, token_file)
    return server
