"""PostgreSQL DSNs as settings (adapter ``journal``, Results Service ``resultsDatabase``):
which strings name PostgreSQL, how to show one without its password, and the session
limits both open their connections with (``session_limits``).

libpq takes a URL (``postgresql://`` or ``postgres://``) or ``key=value`` pairs. A
password may sit in the URL's user part, in its query (``?password=``) or in a
``password=`` pair; every place a DSN is shown (errors, logs) goes through
``redacted``. A string that is neither a DSN nor meant as a file (another URL
scheme) is refused rather than taken as a SQLite file named after it.
"""
from __future__ import annotations

import re

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# libpq connection keywords a key=value DSN starts with in practice (a SQLite file name does not)
_KEYWORD_DSN = re.compile(
    r"^\s*(host|hostaddr|port|dbname|user|password|passfile|service|sslmode|sslrootcert|sslcert|sslkey|"
    r"application_name|connect_timeout|options|target_session_attrs|channel_binding|gssencmode)\s*=", re.I)
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# the password runs to the last @ of the authority (an unencoded @ in it too)
_URL_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^/?#]*@")
_URL_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.I)
# value: a quoted string (backslash escapes) or a run without blanks
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)", re.I)


def is_postgres_dsn(spec: str) -> bool:
    """A libpq DSN: ``postgresql://…``, ``postgres://…`` or ``key=value`` pairs."""
    return spec.startswith(POSTGRES_SCHEMES) or bool(_KEYWORD_DSN.match(spec))


def is_foreign_url(spec: str) -> bool:
    """A URL of a scheme other than PostgreSQL's and ``sqlite:`` (``POSTGRESQL://``,
    ``postgresql+psycopg://``, ``mysql://``…): not a database we open, nor a file name."""
    return bool(_URL_SCHEME.match(spec)) and not spec.startswith(POSTGRES_SCHEMES + ("sqlite:",))


def redacted(spec: str) -> str:
    """``spec`` with every password replaced by ``***`` (URL user part, URL query, key=value)."""
    if _URL_SCHEME.match(spec):
        spec = _URL_USERINFO_PASSWORD.sub(r"\1:***@", spec)
        return _URL_QUERY_PASSWORD.sub(r"\1***", spec)
    return _KEYWORD_PASSWORD.sub(r"\1***", spec)


FOREIGN_URL_HINT = ("not a postgresql:// DSN (the scheme is lowercase postgresql:// or postgres://), "
                    "nor a SQLite file path")

# A transaction idle this long between statements belongs to a replica that stalled (SIGSTOP,
# a frozen node): the server ends its session, so the rows it locked do not stall the other
# replicas until it resumes; its own transaction then fails. Legitimate gaps are milliseconds.
IDLE_IN_TRANSACTION_SECONDS = 10.0
# The database cut off by the network (packets dropped, no reset): data unacknowledged this
# long fails the connection (libpq tcp_user_timeout; keepalives for idle connections), instead
# of a request blocking until TCP gives up (~15 min).
NETWORK_TIMEOUT_SECONDS = 10.0


def session_limits(idle_in_transaction: float = IDLE_IN_TRANSACTION_SECONDS,
                   network_timeout: float = NETWORK_TIMEOUT_SECONDS, options: str = "") -> dict[str, object]:
    """libpq connection keywords for both limits above (``options``: more ``-c`` settings)."""
    half = max(1, round(network_timeout / 2))
    return {"tcp_user_timeout": max(1, round(network_timeout * 1000)), "keepalives": 1,
            "keepalives_idle": half, "keepalives_interval": 1, "keepalives_count": half,
            "options": f"{options} -c idle_in_transaction_session_timeout={max(1, round(idle_in_transaction * 1000))}"
                       .strip()}
