"""General acknowledgments (ACK) for inbound messages: HL7 v2.5.1 chapter 2.9 (acknowledgment
processing), 2.14.1 (ACK), 2.15.8 (MSA) and 2.15.5 (ERR).

Original mode answers AA (accepted), AE (application error: the content is wrong, resending it
unchanged will fail again) or AR (application reject: the message type, processing id or version
is not supported, the message is unreadable, or the receiver failed; the sender may resend).
Enhanced mode (MSH-15/MSH-16 present) answers the commit-level CA, CE or CR the same way.
"""

import contextlib
import re
from datetime import datetime

from hl7_bridge.mllp import END_BLOCK, START_BLOCK
from mappings.errors import MappingError
from mappings.v2 import Encoding, Message, encode_field, escape

#: What no ACK value may hold raw: MLLP's block characters and line ends (they end a segment).
_CONTROL = re.compile(r"[\x0b\x1c\r\n]")

#: Table 0357 texts for ERR-3.2.
ERROR_TEXT = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}
#: Codes that reject the message rather than its content (AR/CR instead of AE/CE), unless the error
#: says otherwise (``MappingError.rejects``).
REJECT_CODES = {100, 200, 201, 202, 203, 207}


def ack_code(message: Message | None, error: MappingError | None) -> str:
    """MSA-1 for the outcome: AA/AE/AR, or CA/CE/CR when the sender asked for enhanced mode."""
    enhanced = message is not None and not message.msh.field(15).is_empty()
    if error is None:
        return "CA" if enhanced else "AA"
    rejected = message is None or (error.code in REJECT_CODES if error.rejects is None else error.rejects)
    return ("CR" if rejected else "CE") if enhanced else ("AR" if rejected else "AE")


def acknowledge(message: Message | None, error: MappingError | None, *, control_id: str, now: datetime) -> bytes:
    """The ACK for ``message`` (None when it could not be parsed at all), as CR-separated text.

    MSH-3..6 mirror the sender's MSH-5/6/3/4, MSA-2 echoes MSH-10, and an error adds an ERR
    segment with its location (ERR-2), table 0357 code (ERR-3), severity E (ERR-4) and the
    readable text (ERR-8). It is always framable and encodable (``_framable``): in the message's
    character set (MSH-18) when every character fits, else in ASCII.
    """
    charset = message.charset if message is not None else "ascii"
    for codec in (charset, "ascii"):
        with contextlib.suppress(UnicodeError, LookupError):
            ack = _text(message, error, control_id, now, codec).encode(codec)
            if START_BLOCK not in ack and END_BLOCK not in ack:
                return ack
    # Only delimiters (MSH-1, MSH-2) outside ASCII get here: answered in ASCII, those replaced.
    return _text(message, error, control_id, now, "ascii").encode("ascii", errors="replace")


def _text(message: Message | None, error: MappingError | None, control_id: str, now: datetime, codec: str) -> str:
    """The ACK's segments, every value escaped for the message's delimiters and made fit for ``codec``."""
    enc = message.encoding if message is not None else Encoding()
    msh = message.msh if message is not None else None

    def safe(text: str) -> str:
        return _framable(text, enc, codec)

    def mirror(n: int) -> str:
        return safe(encode_field(msh.field(n), enc)) if msh is not None else ""

    delimiters = f"{enc.component}{enc.repetition}{enc.escape}{enc.subcomponent}"
    trigger = msh.field(9).component(2) if msh is not None else ""
    f = enc.field
    segments = [
        f.join([
            "MSH", delimiters, mirror(5), mirror(6), mirror(3), mirror(4), now.strftime("%Y%m%d%H%M%S"), "",
            f"ACK{enc.component}{safe(escape(trigger, enc))}{enc.component}ACK", safe(escape(control_id, enc)),
            mirror(11) or "P", mirror(12) or "2.5.1",
        ]),
        f.join(["MSA", ack_code(message, error), mirror(10)]),
    ]  # fmt: skip
    if error is not None:
        c = enc.component
        location = _error_location(error.location, c)
        code = f"{error.code}{c}{escape(ERROR_TEXT.get(error.code, ''), enc)}{c}HL70357"
        segments.append(f.join(["ERR", "", location, code, "E", "", "", "", safe(escape(error.text, enc))]))
    return "\r".join(segments) + "\r"


def _framable(text: str, enc: Encoding, codec: str) -> str:
    """``text`` (already escaped) with each of ``_CONTROL``, and every character ``codec`` cannot
    encode, written as a hexadecimal escape of its UTF-8 bytes (v2.5.1 §2.7.3, ``\\Xhh\\``).

    An ACK must be framable (MLLP R2: no 0x0B or 0x1C in a block; the CR ends a segment) and
    encodable in the character set it is sent in; the original stays in the message store.
    """
    if _CONTROL.search(text) is None:
        with contextlib.suppress(UnicodeError):
            text.encode(codec)
            return text
    return "".join(_hex(ch, enc) if _CONTROL.match(ch) or not _fits(ch, codec) else ch for ch in text)


def _fits(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
    except UnicodeError:
        return False
    return True


def _hex(ch: str, enc: Encoding) -> str:
    return f"{enc.escape}X{ch.encode('utf-8', errors='replace').hex().upper()}{enc.escape}"


def _error_location(location: str, c: str) -> str:
    """ERR-2 (data type ERL: segment^sequence^field^repetition^component) from "PID-3" or "OBR-4.1"."""
    segment, _, position = location.partition("-")
    if not segment.isalnum():
        return ""
    field, _, component = position.partition(".")
    parts = [segment, "1", field, "1" if component else "", component] if field.isdigit() else [segment]
    return c.join(parts).rstrip(c)
