"""How this process runs pydicom and pynetdicom, and why (figures in docs/performance.md).

The settings below that are process-wide (pynetdicom's ``_config``, pydicom's validation modes) are set
by :func:`apply`, called once where a process starts serving DICOM (``overread serve``'s imaging side,
the sample PACS, the DICOM bench), never on import: a program that imports the DIMSE client keeps
pydicom as it was. Every module here that opens or accepts an association imports this one for
:data:`ASSOCIATION_HANDLERS`, which are per association, so no association goes without them.

- TCP_NODELAY. DIMSE is request/response with small PDUs (a C-ECHO, a C-FIND response, the last
  fragment of a C-STORE); with Nagle's algorithm on, each can wait for the peer's delayed ACK
  (~40 ms on Linux).
- The DUL poll. pynetdicom's DUL thread sleeps 1 ms whenever it finds nothing to do, so every
  message it hands over or sends can wait that long, and a C-MOVE sends one per instance.
- Unrestricted storage. Where pynetdicom accepts storage (the bundled sample PACS taking a
  push; our own Storage SCP and C-GET, :mod:`dicom_bridge.upper_layer`, negotiate the same way
  without pynetdicom's threads) every storage SOP class, private ones included, is accepted in
  the first transfer syntax the peer proposes: the bytes are kept as received, so no syntax
  needs converting and no PACS is made to transcode. It also spares the deep copy of 170 listed
  storage contexts pynetdicom makes per association.
- No per-message log. pynetdicom's "standard" handlers format every DIMSE message for its log
  whether or not anything shows it; nothing here shows pynetdicom's
  INFO/DEBUG lines, and its warnings and errors are still logged. Set ``LOG_HANDLER_LEVEL`` back
  to "standard" to debug DIMSE traffic.
- No value validation. pydicom checks every value it reads or sets against its VR and warns
  (its default), then uses the value anyway; pynetdicom builds several Datasets per DIMSE
  message, so a retrieve pays for warnings nobody reads. The values are the
  same either way; answers are judged where they are mapped (:mod:`mappings.imaging_study`).
- A reactor that does not steal responses. Each pynetdicom association has a reactor thread that
  takes incoming DIMSE messages off the queue; a ``send_*`` call pauses it first, but the pause
  races (pynetdicom 3.0.4, ``Association._run_reactor``; pydicom/pynetdicom#875): the reactor
  says it is paused just before it passes its checkpoint; a caller that clears the checkpoint in
  that instant sends its request while the reactor goes on, the reactor takes the peer's response
  ("Received unexpected C-FIND service message") and the caller waits out the DIMSE timeout. It
  failed a linking test in CI under load. :func:`reactor_keeps_its_pause` makes the reactor's
  own, non-blocking take look at the checkpoint again.

Bind :data:`ASSOCIATION_HANDLERS` to every AE's ``start_server`` and ``associate`` call::

    ae.start_server(address, evt_handlers=[*ASSOCIATION_HANDLERS, ...])
    ae.associate(host, port, evt_handlers=ASSOCIATION_HANDLERS)
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pydicom.config
from pynetdicom import _config, evt
from pynetdicom.events import Event, EventHandlerType

#: Seconds the DUL thread sleeps when idle (pynetdicom's default is 1 ms). Only while an
#: association is open: a server without associations does not poll.
DUL_POLL = 0.0001


def apply() -> None:
    """Unrestricted storage, no per-message log, no value validation, for the whole process (idempotent)."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_HANDLER_LEVEL = "none"
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def nodelay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: switch Nagle's algorithm off on the association's socket."""
    dul_socket = event.assoc.dul.socket
    sock = dul_socket.socket if dul_socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quick_poll(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: the DUL thread checks its socket and queues every :data:`DUL_POLL`."""
    event.assoc.dul._run_loop_delay = DUL_POLL  # the knob pynetdicom's run_reactor documents


def reactor_keeps_its_pause(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: the reactor takes no DIMSE message while a ``send_*`` call holds it paused.

    Only the reactor takes messages without blocking (``get_msg(block=False)``); every ``send_*``
    call blocks for its response. A ``send_*`` call clears the checkpoint before it looks whether
    the reactor is paused, so a reactor that slipped past the checkpoint finds it cleared here and
    leaves the message on the queue for the caller.
    """
    assoc = event.assoc
    if not isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event):
        return  # a pynetdicom whose reactor pauses otherwise: this mends 3.0's
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block and not assoc._reactor_checkpoint.is_set():
            return None, None
        return take(block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


ASSOCIATION_HANDLERS: list[EventHandlerType] = [
    (evt.EVT_CONN_OPEN, nodelay),
    (evt.EVT_CONN_OPEN, quick_poll),
    (evt.EVT_CONN_OPEN, reactor_keeps_its_pause),
]

__all__ = ["ASSOCIATION_HANDLERS", "DUL_POLL", "apply", "nodelay", "quick_poll", "reactor_keeps_its_pause"]
