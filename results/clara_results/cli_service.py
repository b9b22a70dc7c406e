"""`clara-dicom results-service`: the Results Service alone.

Standard library only at top level; the server is imported inside ``run``.
"""
from __future__ import annotations

import argparse
import os

DEFAULT_PORT = 8088


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number of seconds, not negative")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("CLARA_RESULTS_HOST", "0.0.0.0"),
                        help="address to listen on (default 0.0.0.0; env CLARA_RESULTS_HOST)")
    parser.add_argument("--port", type=_port, default=None,
                        help=f"TCP port (default {DEFAULT_PORT}; env CLARA_RESULTS_PORT)")
    parser.add_argument("--database", default=None, metavar="DSN",
                        help="SQLite file path or sqlite:///PATH (default results.db), or a PostgreSQL DSN "
                             "postgresql://user@host:5432/db (env CLARA_RESULTS_DATABASE)")
    parser.add_argument("--max-retries", type=_positive_int, default=None, metavar="N",
                        help="failures after which a task is Failed even with retryLater (default 3; "
                             "env CLARA_RESULTS_MAX_RETRIES)")
    parser.add_argument("--lease-seconds", type=_seconds, default=None, metavar="S",
                        help="how long a lease lasts unless its holder renews it; an expired lease counts "
                             "as a failed attempt with retryLater (default 300)")
    parser.add_argument("--retry-delay", type=_seconds, default=None, metavar="S",
                        help="a task failed with retryLater waits S * 2^(retries-1) seconds before it "
                             "can be leased again (default 10)")
    parser.add_argument("--retention", type=_seconds, default=None, metavar="S",
                        help="seconds finished tasks are kept (default 604800 = 7 days; "
                             "env CLARA_RESULTS_RETENTION)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="file holding the bearer token (default: env CLARA_RESULTS_TOKEN)")


def _env_number(name: str, convert: type, default: float) -> float:
    from clara_dicom.errors import UserError

    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise UserError(f"{name} must not be negative")
    return value


def read_token(token_file: str | None) -> str:
    """The token from ``token_file`` (surrounding whitespace stripped), else CLARA_RESULTS_TOKEN."""
    from clara_dicom.errors import UserError

    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise UserError(f"cannot read --token-file {token_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UserError(f"--token-file {token_file} is not UTF-8 text") from None
        if not token:
            raise UserError(f"--token-file {token_file} is empty")
        return token
    token = os.environ.get("CLARA_RESULTS_TOKEN", "").strip()
    if not token:
        raise UserError("no token: set CLARA_RESULTS_TOKEN or pass --token-file PATH")
    return token


def run(args: argparse.Namespace) -> int:
    from clara_dicom.errors import UserError
    from clara_results import store as st
    from clara_results.server import ResultsServer

    token = read_token(args.token_file)
    port = args.port if args.port is not None else int(_env_number("CLARA_RESULTS_PORT", int, DEFAULT_PORT))
    if not 0 <= port <= 65535:
        raise UserError("CLARA_RESULTS_PORT must be between 0 and 65535")
    database = args.database or os.environ.get("CLARA_RESULTS_DATABASE") or "results.db"
    max_retries = args.max_retries or int(_env_number("CLARA_RESULTS_MAX_RETRIES", int, st.DEFAULT_MAX_RETRIES))
    if max_retries < 1:
        raise UserError("CLARA_RESULTS_MAX_RETRIES must be at least 1")
    lease = args.lease_seconds if args.lease_seconds is not None else st.DEFAULT_LEASE_SECONDS
    if lease <= 0:
        raise UserError("--lease-seconds must be positive")
    retention = args.retention if args.retention is not None else _env_number(
        "CLARA_RESULTS_RETENTION", float, st.DEFAULT_RETENTION_SECONDS)
    server = ResultsServer(
        host=args.host,
        port=port,
        database=database,
        token=token,
        max_retries=max_retries,
        lease_seconds=lease,
        retry_delay=args.retry_delay if args.retry_delay is not None else st.DEFAULT_RETRY_DELAY,
        retention_seconds=retention,
    )
    server.serve_forever()
    return 0
