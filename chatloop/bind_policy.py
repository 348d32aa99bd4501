"""Secure by default: a stage or coordinator reachable from other machines must have a cluster token.

A stage answers forward calls from anyone who can reach its port, and a coordinator sends its stages
whatever token it has. On loopback only local processes can connect; anywhere else a missing
``security.cluster_token`` is refused at start-up unless the configuration says ``allow_insecure: true``
(a network the operator trusts, e.g. a private container network).
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and localhost; False for anything else, including
    ``""``/``0.0.0.0``/``::`` (every interface) and other host names (they may resolve to any address)."""
    name = str(host).strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def insecure_bind_error(role: str, host: str, cluster_token: str | None, allow_insecure: bool) -> str | None:
    """The reason ``role`` must not start listening on ``host``, or None when it may."""
    if cluster_token or is_loopback(host):
        return None
    if allow_insecure:
        log.warning(
            "%s listens on %s without a cluster token (allow_insecure: true): anyone who can reach it can use it",
            role,
            host,
        )
        return None
    return (
        f"refusing to listen on {host!r} without a cluster token: anyone who can reach this {role} could use it. "
        "Set security.cluster_token (environment: CHATLOOP_SECURITY__CLUSTER_TOKEN) to a shared secret, "
        "the same in the coordinator and every stage, or set allow_insecure: true "
        "(CHATLOOP_ALLOW_INSECURE=true) on a network you trust, or listen on 127.0.0.1"
    )
