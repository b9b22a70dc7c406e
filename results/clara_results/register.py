"""register-results: register a pipeline's output files with the Results Service.

    register-results --agent NAME [--data JSON_ARRAY] [--input DIR]...
    clara-dicom register-results ...          (same)
    python register.py ...                    (Clara pipelines, from the image's working directory)

Scans every input directory (``--input``, else ``CLARA_INPUT_PATHS``) recursively
and creates, for each element of ``--data`` (or once, with null parameters, without
``--data``), one task for ``--agent`` whose ``uris`` are all files found, relative
to ``CLARA_PAYLOAD_ROOT``, and whose ``parameters`` is the element's JSON
serialisation. Each task carries an idempotency key over (job ID, operator, agent,
element index), so running it again registers nothing twice.

Exit status: 0 done; 2 bad input (one line on stderr); 1 the service refused a
request; 3 the service stayed unreachable after the retries.

Standard library only at top level (the HTTP client is imported inside ``run``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

from clara_dicom.errors import UserError
from clara_results import models as m

PROG = "register-results"


class ServiceError(UserError):
    """The Results Service answered but refused the request."""

    exit_code = 1


class ServiceUnreachable(UserError):
    """The Results Service could not be reached, even after retrying."""

    exit_code = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", required=True,
                        help="the agent that processes the tasks, e.g. ClaraSCU or renderserver")
    parser.add_argument("--data", default=None, metavar="JSON_ARRAY",
                        help="a non-empty JSON array; each element becomes one task whose parameters is the "
                             "element's JSON serialisation, e.g. '[\"Orthanc\",\"DCM4CHEE\"]'. At most "
                             f"{MAX_DATA_LENGTH} characters, {MAX_DATA_DEPTH} levels of nesting and "
                             f"{MAX_DATA_ELEMENTS} elements")
    parser.add_argument("--input", action="append", default=None, metavar="DIR",
                        help="a directory to scan (repeatable; default: CLARA_INPUT_PATHS, colon-separated)")
    # No defaults here: a flag not given leaves the environment, then the default, to decide
    # (clara_results.settings.RegisterSettings).
    parser.add_argument("--url", default=None, help="Results Service URL (default: CLARA_RESULTS_URL)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="file holding the bearer token (default: CLARA_RESULTS_TOKEN_FILE, else the token "
                             "in CLARA_RESULTS_TOKEN)")
    parser.add_argument("--attempts", default=None, metavar="N",
                        help="tries per request while the service is unreachable (default 6; "
                             "env CLARA_RESULTS_ATTEMPTS)")
    parser.add_argument("--retry-wait", default=None, metavar="S",
                        help="first wait between tries, doubling up to 30 s, longer if the service answers "
                             "Retry-After (default 1; env CLARA_RESULTS_RETRY_WAIT)")
    parser.add_argument("--timeout", default=None, metavar="S",
                        help="seconds per request (default 30; env CLARA_RESULTS_TIMEOUT)")


# --------------------------------------------------------------------------- inputs
def _required(settings: Any, setting: str, label: str) -> str:
    from clara_dicom.settings import env_names

    value = (getattr(settings, setting) or "").strip()
    if not value:
        raise UserError(f"{' / '.join(env_names(setting))} is not set: {label} is needed")
    return value


#: Limits on ``--data`` (documented in --help and results/README.md). The length is also
#: Linux's limit for one command-line argument (MAX_ARG_STRLEN).
MAX_DATA_LENGTH = 131_072
MAX_DATA_DEPTH = 64
MAX_DATA_ELEMENTS = 1000


def _nesting_depth(text: str, limit: int) -> int:
    """How deep ``[``/``{`` nest in JSON ``text`` (outside strings), counting no further than ``limit + 1``."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_data(text: str | None) -> list[str | None]:
    """``--data`` → the ``parameters`` of each task (``[None]`` without ``--data``).

    Any text either parses or raises UserError with one line: at most MAX_DATA_LENGTH
    characters, MAX_DATA_DEPTH levels of nesting and MAX_DATA_ELEMENTS elements.
    """
    if text is None:
        return [None]
    if len(text) > MAX_DATA_LENGTH:
        raise UserError(f"--data is longer than {MAX_DATA_LENGTH} characters ({len(text)})")
    # Checked before parsing: the parser recurses once per level.
    if _nesting_depth(text, MAX_DATA_DEPTH) > MAX_DATA_DEPTH:
        raise UserError(f"--data nests arrays/objects deeper than {MAX_DATA_DEPTH} levels")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"the number {number[:20]} is too large")
        return value

    try:
        value = json.loads(text, parse_constant=no_constants, parse_float=finite)
    except (ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "not JSON"
        raise UserError(f"--data is not valid JSON: {first[:200]}") from None
    if not isinstance(value, list) or not value:
        raise UserError("--data must be a non-empty JSON array, e.g. '[\"Orthanc\"]'")
    if len(value) > MAX_DATA_ELEMENTS:
        raise UserError(f"--data has {len(value)} elements; at most {MAX_DATA_ELEMENTS} (one task each)")
    parameters = []
    for i, element in enumerate(value):
        serialised = json.dumps(element)
        if len(serialised) > m.MAX_PARAMETERS_LENGTH:
            raise UserError(f"--data element {i} is longer than {m.MAX_PARAMETERS_LENGTH} characters")
        parameters.append(serialised)
    return parameters


def check_agent(agent: str) -> str:
    if not m.is_valid_agent(agent):
        raise UserError(
            f"bad agent name {agent[:80]!r}: use letters, digits and hyphens, start with a letter, "
            "do not end with a hyphen, at most 63 characters"
        )
    return agent


def _show(path: str) -> str:
    """A path for a one-line message (control characters escaped)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path) or m.text_problem(path):
        return ascii(path)
    return path


def scan(inputs: list[str], payload_root: str) -> list[str]:
    """Every file under ``inputs`` as a sorted list of '/'-separated paths relative to ``payload_root``.

    Symbolic links are followed; a file whose real location is outside the payload
    root is an error (UserError), as is finding no file at all.
    """
    root = os.path.realpath(payload_root)
    if not os.path.isdir(root):
        raise UserError(f"payload root {_show(payload_root)} (CLARA_PAYLOAD_ROOT) is not a directory")
    uris: set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            return  # broken link, socket, fifo...
        try:
            inside = os.path.commonpath([root, real]) == root
        except ValueError:
            inside = False
        if not inside:
            raise UserError(
                f"file {_show(path)} is outside the payload root {_show(payload_root)} (CLARA_PAYLOAD_ROOT)")
        uri = os.path.relpath(real, root).replace(os.sep, "/")
        problem = m.uri_problem(uri)
        if problem:
            raise UserError(f"file {_show(path)} cannot be registered: its path {problem}")
        uris.add(uri)

    for top in inputs:
        if not os.path.exists(top):
            raise UserError(f"input {_show(top)} does not exist")
        if not os.path.isdir(top):
            add(top)
            continue
        seen_dirs: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=None):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirnames[:] = []  # a link loop
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirnames.sort()
            for name in sorted(filenames):
                add(os.path.join(dirpath, name))
    if not uris:
        raise UserError(f"no files found in {', '.join(_show(i) for i in inputs)}")
    if len(uris) > m.MAX_URIS:
        raise UserError(f"{len(uris)} files found; a task holds at most {m.MAX_URIS}")
    return sorted(uris)


def idempotency_key(job_id: str, operator: str, agent: str, index: int) -> str:
    """The key that makes re-running register-results harmless: (jobId, operator, agent, element index)."""
    digest = hashlib.sha256(json.dumps([job_id, operator, agent, index]).encode("utf-8")).hexdigest()
    return f"register-results-{digest}"


def _check_id(label: str, value: str, pattern: Any) -> str:
    if not pattern.match(value):
        raise UserError(f"{label} {value[:80]!r} is not a valid ID")
    return value


# --------------------------------------------------------------------------- run
#: The longest Retry-After we honour: a longer one is the service's mistake, not a plan.
RETRY_AFTER_LIMIT = 60.0


def _sleep(seconds: float) -> None:
    """How register-results waits between tries (a test records the waits instead)."""
    import time

    time.sleep(seconds)


def _log_retry(state: Any) -> None:
    import logging

    exc = state.outcome.exception()
    logging.getLogger(PROG).warning("%s; retrying in %g s", exc, round(state.upcoming_sleep, 1))


def run(args: argparse.Namespace) -> int:
    # Input checks first, in the order SPEC §4 lists them; none needs the service.
    parameters = parse_data(args.data)
    agent = check_agent(args.agent)

    from clara_dicom.settings import results_token
    from clara_results.settings import RegisterSettings

    settings = RegisterSettings.load(flags={
        "resultsUrl": args.url, "resultsTokenFile": args.token_file, "resultsAttempts": args.attempts,
        "resultsRetryWait": args.retry_wait, "resultsTimeout": args.timeout})
    job_id = _check_id("job ID", _required(settings, "jobId", "the job ID"), m.ID_RE)
    pipeline_id = _check_id("pipeline ID", _required(settings, "pipelineId", "the pipeline ID"), m.ID_RE)
    payload_id = _check_id("payload ID", _required(settings, "payloadId", "the payload ID"), m.PAYLOAD_ID_RE)
    operator = _check_id("operator name", _required(settings, "operator", "the pipeline operator's name"), m.ID_RE)
    payload_root = _required(settings, "payloadRoot", "the job's payload directory")

    inputs = args.input
    if not inputs:
        inputs = [p for p in (settings.inputPaths or "").split(":") if p.strip()]
    if not inputs:
        raise UserError("no input directories: pass --input DIR or set CLARA_INPUT_PATHS")
    uris = scan(inputs, payload_root)

    url = _required(settings, "resultsUrl", "the Results Service URL")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"Results Service URL {url[:80]!r} must start with http:// or https://")
    token = (results_token(settings.resultsToken, settings.resultsTokenFile, "--token-file")
             or _required(settings, "resultsToken", "the Results Service token"))
    attempts, wait = settings.resultsAttempts, settings.resultsRetryWait

    import logging

    from tenacity import retry_if_exception_type

    from clara_dicom.retrying import RESULTS_REGISTER, wait_retry_after
    from clara_results.client import ResultsClient, ResultsError, ResultsUnavailable

    policy = RESULTS_REGISTER.with_(attempts=attempts, initial=min(wait, RESULTS_REGISTER.cap))

    # httpx logs every request at INFO; this command prints its own one line per task.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    created_count = 0
    with ResultsClient(url, token, timeout=settings.resultsTimeout) as client:
        for index, params in enumerate(parameters):
            key = idempotency_key(job_id, operator, agent, index)
            try:
                for attempt in policy.retrying(retry=retry_if_exception_type(ResultsUnavailable),
                                               wait=wait_retry_after(policy.wait(), RETRY_AFTER_LIMIT),
                                               sleep=lambda seconds: _sleep(seconds), before_sleep=_log_retry):
                    with attempt:
                        task, created = client.create_task_ex(
                            job_id=job_id, pipeline_id=pipeline_id, payload_id=payload_id, agent=agent,
                            uris=uris, parameters=params, operator=operator, idempotency_key=key,
                        )
            except ResultsUnavailable as exc:
                raise ServiceUnreachable(f"{exc} (gave up after {attempts} attempts)") from None
            except ResultsError as exc:
                raise ServiceError(str(exc)) from None
            created_count += created
            what = "registered" if created else "already registered"
            print(f"{what}: task {task.id} for agent {agent} (element {index}, {len(uris)} file(s))")
    print(f"{created_count} new task(s), {len(parameters) - created_count} already registered")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``register-results`` console script (and ``python register.py``)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Register a pipeline's output files with the Results Service as tasks for an agent."
    )
    from clara_dicom.cli import add_log_options, configure_logging, run_command

    add_arguments(parser)
    add_log_options(parser)
    args = parser.parse_args(argv)
    configure_logging(parser, args, PROG)
    return run_command(sys.modules[__name__], args, PROG)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
