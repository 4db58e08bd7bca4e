"""HL7 intake without a listener: one message as the MLLP listener's unit runs it (``overread.app.mllp_listener``)."""

from collections.abc import Sequence

from fhir_server.db import Database
from fhir_server.repository import Hook
from hl7_bridge.intake import Senders, receive_in


def receive(db: Database, raw: bytes, senders: Senders | None = None, hooks: Sequence[Hook] = ()) -> bytes:
    """Store, map and write one message in a transaction of its own; the ACK to send.

    ``senders`` gives the mapping settings of a sending application and facility (MSH-3, MSH-4).
    """
    with db.begin() as conn:
        return receive_in(conn, raw, senders, hooks)
