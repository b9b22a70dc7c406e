"""The `clara-dicom` command line.

Each subcommand lives in the package that owns it, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import only
the standard library at top level, so building the parser stays fast; the
heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clara_dicom.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("clara_adapter.cli_up", "local mode: adapter + Results Service + local job sink"),
    "jobs": ("clara_adapter.cli_jobs", "inspect the PipelineJobs local mode created"),
    "adapter": ("clara_adapter.cli_adapter", "the adapter in Kubernetes mode"),
    "operator": ("clara_operator.cli", "the kopf operator"),
    "results-service": ("clara_results.cli_service", "the Results Service alone"),
    "register-results": ("clara_results.register", "register pipeline outputs with the Results Service"),
    "import": ("clara_dicom.importer", "Clara configuration -> manifests on stdout"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clara-dicom",
        description="DICOM adapter and Kubernetes operator turning studies into AI pipeline jobs.",
    )
    add_log_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # a part not installed in this build
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the subcommand; SUPPRESS keeps the global value otherwise.
        p.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--log-format", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(parser, args, args.command)
    return run_command(args._module, args, f"clara-dicom {args.command}")


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, shared by clara-dicom and register-results."""
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING or ERROR (default: env CLARA_LOG_LEVEL, else INFO)")
    parser.add_argument("--log-format", default=None, metavar="json|text",
                        help="text lines for people, or one JSON object a line for a log indexer "
                             "(default: env CLARA_LOG_FORMAT, else text)")


def configure_logging(parser: argparse.ArgumentParser, args: argparse.Namespace, component: str) -> None:
    """Set up logging from the parsed options; a bad value is a usage error (one line, exit 2)."""
    from clara_dicom.logs import setup_logging
    from clara_dicom.settings import LogSettings

    try:
        settings = LogSettings.load(flags={"logLevel": args.log_level, "logFormat": args.log_format})
    except UserError as exc:
        parser.error(str(exc))
    setup_logging(getattr(logging, settings.logLevel), settings.logFormat, component)


def run_command(module, args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand module; a UserError becomes one line on stderr, not a traceback."""
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
