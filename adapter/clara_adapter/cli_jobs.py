"""`clara-dicom jobs list`: the PipelineJobs local mode created."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="list PipelineJobs")
    lst.add_argument("--state", default="state", metavar="DIR", help="state folder of `clara-dicom up` (default ./state); "
                     "replicas sharing it list each other's jobs")
    lst.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table (default) or json")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from clara_dicom.errors import UserError
    from clara_adapter.jobs import LocalJobSink

    folder = Path(args.state) / "jobs"
    if not Path(args.state).is_dir():
        raise UserError(f"state folder {args.state} does not exist: pass the --state of `clara-dicom up`")
    jobs = LocalJobSink(folder).list() if folder.is_dir() else []
    if args.output == "json":
        print(json.dumps(jobs, indent=2))
        return 0
    from clara_dicom.logs import short_hash

    rows = [("NAME", "PIPELINE", "PRIORITY", "GROUP", "INSTANCES", "CREATED")]
    for job in jobs:
        spec = job["spec"]
        # The group value may be a PatientID: show its hash, as everywhere outside the spec.
        rows.append((job["metadata"]["name"], spec["pipeline"], spec["priority"],
                     f"{spec['group']['by']}:{short_hash(spec['group']['value'])}",
                     str(spec["payload"]["instances"]), job["metadata"].get("creationTimestamp", "")[:19]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0
