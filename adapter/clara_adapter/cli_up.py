"""`clara-dicom up`: local mode — adapter + Results Service + local job sink."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="examples/local", metavar="PATH",
                   help="file or folder of manifests (default: examples/local)")
    p.add_argument("--state", default="state", metavar="DIR",
                   help="state folder: received files, payloads, journal, jobs (default: ./state)")
    p.add_argument("--dicom-port", type=int, metavar="N", help="DICOM port (default 11112)")
    p.add_argument("--http-port", type=int, metavar="N", help="health/metrics port (default 8080)")
    p.add_argument("--results-port", type=int, metavar="N",
                   help="Results Service port (default: HTTP port + 1; 0 disables the Results Service)")
    p.add_argument("--receive-workers", type=int, metavar="N",
                   help="processes receiving DICOM (default 0: in the main process)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--settings", metavar="FILE", help="adapter settings file (YAML)")
    p.add_argument("--journal", metavar="DSN",
                   help="journal: a postgresql:// DSN, or a SQLite file (default: STATE/journal.sqlite); "
                        "several `up` processes on one DSN and one --state act as one adapter (docs/scaling.md)")


def run(args: argparse.Namespace) -> int:
    from clara_adapter.local_mode import run_local

    return run_local(args)
