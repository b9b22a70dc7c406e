"""TLS client contexts for C-STORE destinations with ``spec.tls`` (DICOM TLS, PS3.15 B.1).

The destination's Secret holds ``ca.crt`` (the CA that signs the destination's
certificate; required) and optionally ``tls.crt`` + ``tls.key`` (our client
certificate, for destinations that require one) — the keys of a Kubernetes
``kubernetes.io/tls`` Secret plus its CA.
"""
from __future__ import annotations

import ssl

from clara_dicom.models import DestinationTLS

from clara_adapter.export.secrets import SecretError, SecretsDir

CA_KEY, CERT_KEY, KEY_KEY = "ca.crt", "tls.crt", "tls.key"


def client_context(tls: DestinationTLS, secrets: SecretsDir) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2+, hostname checked against ``serverName`` or the host).

    SecretError when the Secret lacks what is needed or holds something unusable."""
    name = tls.secretRef.name
    ca = secrets.read(name, CA_KEY)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=ca.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise SecretError(f"Secret {name} key {CA_KEY} is not a PEM CA certificate: {exc}") from None
    has_cert, has_key = secrets.has(name, CERT_KEY), secrets.has(name, KEY_KEY)
    if has_cert != has_key:
        raise SecretError(f"Secret {name} has {CERT_KEY if has_cert else KEY_KEY} without "
                          f"{KEY_KEY if has_cert else CERT_KEY}: the client certificate needs both")
    if has_cert:
        try:
            ctx.load_cert_chain(secrets.path(name, CERT_KEY), secrets.path(name, KEY_KEY))
        except (ssl.SSLError, OSError) as exc:
            raise SecretError(f"Secret {name}: {CERT_KEY}/{KEY_KEY} are not a matching PEM certificate and "
                              f"key: {getattr(exc, 'reason', None) or exc}") from None
    return ctx
