"""Which network interface gloo binds to, from the NCCL setting a site already has.

NCCL_SOCKET_IFNAME is a *filter*: a comma list of name prefixes (``ib``, ``eth``), the whole list negated by a
leading ``^`` (``^docker,lo``) and made exact by a leading ``=`` (``=eth0``, ``^=docker0``), each entry optionally
``:port`` (NCCL's src/misc/socket.cc). GLOO_SOCKET_IFNAME must be an interface's exact name: gloo looks it up and
fails to start when there is none — copying ``ib`` or ``^lo,docker`` across breaks the gloo group that carries the
ranks' stop agreement. So the filter is applied here to this node's interfaces, on the node (names differ between
nodes), and gloo gets the first that passes; with none, GLOO_SOCKET_IFNAME stays unset and gloo picks the interface
of the address this host's name resolves to (its own rule).
"""
from __future__ import annotations

import os
import socket
from typing import Sequence

LOOPBACK = "lo"


def matches(spec: str, name: str) -> bool:
    """Whether NCCL's interface filter ``spec`` admits the interface ``name``."""
    exclude = spec.startswith("^")
    body = spec[1:] if exclude else spec
    exact = body.startswith("=")
    body = body[1:] if exact else body
    entries = [e.split(":", 1)[0].strip() for e in body.split(",")]
    hit = any(e and (name == e if exact else name.startswith(e)) for e in entries)
    return hit != exclude


def gloo_interface(spec: str, interfaces: Sequence[str]) -> str | None:
    """The first of ``interfaces`` (this node's usable ones, in order) that NCCL's ``spec`` admits; None if none.

    An exclusion list (``^...``) never yields the loopback: gloo's peers are on other nodes.
    """
    spec = spec.strip()
    if not spec:
        return None
    for name in interfaces:
        if spec.startswith("^") and name == LOOPBACK:
            continue
        if matches(spec, name):
            return name
    return None


def local_interfaces(sys_net: str = "/sys/class/net") -> list[str]:
    """This host's interfaces that are up (operstate ``up``, or ``unknown`` as the loopback and some virtual
    devices report), in kernel index order."""
    names = []
    for _, name in sorted(socket.if_nameindex()):
        try:
            with open(os.path.join(sys_net, name, "operstate")) as f:
                state = f.read().strip()
        except OSError:
            continue
        if state in ("up", "unknown"):
            names.append(name)
    return names


def gloo_env(environ: dict[str, str], interfaces: Sequence[str] | None = None) -> tuple[dict[str, str], str | None]:
    """({GLOO_SOCKET_IFNAME: name} or {}, a note for the log or None) for a task's environment: only when the user
    set NCCL_SOCKET_IFNAME and not GLOO_SOCKET_IFNAME."""
    spec = environ.get("NCCL_SOCKET_IFNAME", "")
    if not spec or environ.get("GLOO_SOCKET_IFNAME"):
        return {}, None
    names = local_interfaces() if interfaces is None else list(interfaces)
    chosen = gloo_interface(spec, names)
    if chosen is None:
        return {}, (f"NCCL_SOCKET_IFNAME={spec!r} admits none of this node's interfaces ({', '.join(names) or 'none'}):"
                    " GLOO_SOCKET_IFNAME left unset, gloo picks by host name")
    return {"GLOO_SOCKET_IFNAME": chosen}, f"GLOO_SOCKET_IFNAME={chosen} (NCCL_SOCKET_IFNAME={spec!r} on this node)"
