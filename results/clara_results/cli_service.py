"""`clara-dicom results-service`: the Results Service alone.

Standard library only at top level; the settings and the server are imported inside
``run``. Defaults, limits and environment names: clara_results.settings.ResultsServiceSettings.
"""
from __future__ import annotations

import argparse

DEFAULT_PORT = 8088


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No defaults here: a flag not given leaves the environment, then the default, to decide.
    parser.add_argument("--host", default=None,
                        help="address to listen on (default 0.0.0.0; env CLARA_RESULTS_HOST)")
    parser.add_argument("--port", default=None,
                        help=f"TCP port (default {DEFAULT_PORT}; env CLARA_RESULTS_PORT)")
    parser.add_argument("--database", default=None, metavar="DSN",
                        help="SQLite file path or sqlite:///PATH (default results.db), or a PostgreSQL DSN "
                             "postgresql://user@host:5432/db (env CLARA_RESULTS_DATABASE)")
    parser.add_argument("--max-retries", default=None, metavar="N",
                        help="failures after which a task is Failed even with retryLater (default 3; "
                             "env CLARA_RESULTS_MAX_RETRIES)")
    parser.add_argument("--lease-seconds", default=None, metavar="S",
                        help="how long a lease lasts unless its holder renews it; an expired lease counts "
                             "as a failed attempt with retryLater (default 300; env CLARA_RESULTS_LEASE_SECONDS)")
    parser.add_argument("--retry-delay", default=None, metavar="S",
                        help="a task failed with retryLater waits S * 2^(retries-1) seconds before it "
                             "can be leased again (default 10; env CLARA_RESULTS_RETRY_DELAY)")
    parser.add_argument("--retention", default=None, metavar="S",
                        help="seconds finished tasks are kept (default 604800 = 7 days; "
                             "env CLARA_RESULTS_RETENTION)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="file holding the bearer token (default: env CLARA_RESULTS_TOKEN_FILE, "
                             "else the token in CLARA_RESULTS_TOKEN)")


def load(args: argparse.Namespace):
    """The Results Service settings: flags > environment > defaults."""
    from clara_results.settings import ResultsServiceSettings

    return ResultsServiceSettings.load(flags={
        "resultsHost": args.host, "resultsPort": args.port, "resultsDatabase": args.database,
        "resultsMaxRetries": args.max_retries, "resultsLeaseSeconds": args.lease_seconds,
        "resultsRetryDelay": args.retry_delay, "resultsRetention": args.retention,
        "resultsTokenFile": args.token_file})


def run(args: argparse.Namespace) -> int:
    from clara_results.server import ResultsServer

    settings = load(args)
    server = ResultsServer(
        host=settings.resultsHost,
        port=settings.resultsPort,
        database=settings.resultsDatabase,
        token=settings.token(),
        max_retries=settings.resultsMaxRetries,
        lease_seconds=settings.resultsLeaseSeconds,
        retry_delay=settings.resultsRetryDelay,
        retention_seconds=settings.resultsRetention,
    )
    server.serve_forever()
    return 0
