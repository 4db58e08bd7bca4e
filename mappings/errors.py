"""The one error the v2 parser and the order mappings raise.

Codes are HL7 table 0357 (message error condition codes, v2.5.1 chapter 2.15.5 / ERR-3), and the
location is an ERR-2 style path such as ``PID-3``, so the HL7 layer can turn a ``MappingError``
into an AE/AR ACK with an ERR segment without knowing the mapping rules.
"""

from dataclasses import dataclass

REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
SEGMENT_SEQUENCE_ERROR = 100
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT = 201
UNKNOWN_KEY = 204
INTERNAL_ERROR = 207


@dataclass(eq=False)  # not frozen: raising sets __traceback__ (and ``with`` blocks set it again)
class MappingError(Exception):
    """A message that cannot be parsed or mapped: table 0357 ``code``, ERR-2 ``location``, readable ``text``.

    ``rejects`` says whether the ACK rejects the message (AR) or its content (AE); None: as the
    code implies (``hl7_bridge.ack.REJECT_CODES``).
    """

    code: int
    location: str
    text: str
    rejects: bool | None = None

    def __str__(self) -> str:
        return f"{self.code} at {self.location}: {self.text}"
