"""TCP_NODELAY on DICOM association sockets.

DIMSE is request/response with small PDUs (a C-ECHO, a C-FIND response, the last fragment of a
C-STORE); with Nagle's algorithm on, each of them can wait for the peer's delayed ACK (~40 ms on
Linux). Bind :data:`NODELAY_HANDLERS` to every AE's ``start_server`` and ``associate`` call::

    ae.start_server(address, evt_handlers=[*NODELAY_HANDLERS, ...])
    ae.associate(host, port, evt_handlers=NODELAY_HANDLERS)
"""

from __future__ import annotations

import socket

from pynetdicom import evt
from pynetdicom.events import Event, EventHandlerType


def nodelay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: switch Nagle's algorithm off on the association's socket."""
    dul_socket = event.assoc.dul.socket
    sock = dul_socket.socket if dul_socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, nodelay)]

__all__ = ["NODELAY_HANDLERS", "nodelay"]
