"""A small HL7 v2 parser: bytes in, an immutable tree of strings out (no I/O, no grouping).

Implements the encoding rules of HL7 v2.5.1 chapter 2 (2.5 "Message construction rules", 2.7
"Use of escape sequences in text fields"): the field separator is MSH-1, the component,
repetition, escape and subcomponent characters are MSH-2; segments end in CR, LF or CRLF (real
traffic uses all three); a UTF-8 byte order mark is ignored; Z-segments are ordinary segments and
are kept in order. Numbering is 1-based as in the standard: ``seg.field(4).component(2)`` is
XXX-4.2, and for MSH, ``field(1)`` is the field separator itself (so MSH-9 is ``field(9)``).

Why our own parser rather than hl7apy or python-hl7: see ``docs/hl7-parsing.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mappings.errors import DATA_TYPE_ERROR, SEGMENT_SEQUENCE_ERROR, MappingError

BOM = b"\xef\xbb\xbf"
_SEGMENT_END = re.compile(r"\r\n|\r|\n")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
#: The most blank lines or spaces one formatting command (``\\.sp 5\\``, ``\\.in 4\\``) renders.
MAX_FORMAT_COUNT = 100

# MSH-18 values (HL7 table 0211) and the Python codec that reads them.
CHARSETS = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
# Declared sets that are byte-compatible subsets of UTF-8's single-byte range, where bytes that
# happen to be valid UTF-8 almost certainly are UTF-8 (see ``decode``).
_UTF8_PREFERRED = {"", "ASCII", "8859/1", "8859/15"}
#: The codec of a set whose bytes may include MLLP's block characters: such a message is refused.
_UNFRAMEABLE = "utf-16"
#: The shortest line whose next line may be its continuation (``_unwrap``): a transport's fixed line width.
WRAP_WIDTH = 1024
#: The most segments (lines) a message may have: ``overread.settings`` OVERREAD_MLLP_MAX_SEGMENTS.
MAX_SEGMENTS = 10_000


@dataclass(frozen=True)
class Encoding:
    """The delimiters of one message (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


@dataclass(frozen=True)
class Repetition:
    """One occurrence of a field: components, each a tuple of subcomponents (already unescaped)."""

    components: tuple[tuple[str, ...], ...]

    def component(self, n: int) -> str:
        """Component ``n`` (1-based), its first subcomponent; "" when absent."""
        return self.subcomponent(n, 1)

    def subcomponent(self, n: int, m: int) -> str:
        """Subcomponent ``m`` of component ``n`` (both 1-based); "" when absent."""
        if n < 1 or m < 1 or n > len(self.components):
            return ""
        subs = self.components[n - 1]
        return subs[m - 1] if m <= len(subs) else ""

    @property
    def value(self) -> str:
        return self.component(1)

    def is_empty(self) -> bool:
        return all(s == "" for c in self.components for s in c)


EMPTY_REPETITION = Repetition(((),))


@dataclass(frozen=True)
class Field:
    """One field: its repetitions. The accessors without a repetition read the first one."""

    repetitions: tuple[Repetition, ...]

    def component(self, n: int) -> str:
        return self.first.component(n)

    def subcomponent(self, n: int, m: int) -> str:
        return self.first.subcomponent(n, m)

    @property
    def first(self) -> Repetition:
        return self.repetitions[0] if self.repetitions else EMPTY_REPETITION

    @property
    def value(self) -> str:
        """The first component of the first repetition: the whole value of a primitive field."""
        return self.first.value

    def is_empty(self) -> bool:
        return all(r.is_empty() for r in self.repetitions)

    def present(self) -> tuple[Repetition, ...]:
        """The repetitions that carry a value."""
        return tuple(r for r in self.repetitions if not r.is_empty())


EMPTY_FIELD = Field(())


@dataclass(frozen=True)
class Segment:
    """One segment. ``fields[0]`` is XXX-1; for MSH it is MSH-1 (the field separator)."""

    name: str
    fields: tuple[Field, ...]

    def field(self, n: int) -> Field:
        """Field ``n`` (1-based, as in "PID-3"); an empty field when absent."""
        return self.fields[n - 1] if 1 <= n <= len(self.fields) else EMPTY_FIELD


@dataclass(frozen=True)
class Message:
    """A parsed message: its segments in order (Z-segments included) and its delimiters."""

    all_segments: tuple[Segment, ...]
    encoding: Encoding
    charset: str

    def segments(self, name: str | None = None) -> tuple[Segment, ...]:
        """Every segment, or every segment called ``name``, in message order."""
        if name is None:
            return self.all_segments
        return tuple(s for s in self.all_segments if s.name == name)

    def segment(self, name: str) -> Segment | None:
        """The first segment called ``name``, if any."""
        return next((s for s in self.all_segments if s.name == name), None)

    @property
    def msh(self) -> Segment:
        return self.all_segments[0]

    @property
    def message_type(self) -> str:
        """MSH-9.1^MSH-9.2, e.g. ``ORM^O01``."""
        msh9 = self.msh.field(9)
        return f"{msh9.component(1)}^{msh9.component(2)}"


def decode(data: bytes) -> tuple[str, str]:
    """Return the text of ``data`` and the codec used, honouring MSH-18 (character set).

    The declared set wins, except that when MSH-18 is absent, ASCII or 8859/1 (or /15) and the
    bytes are valid UTF-8, they are read as UTF-8: senders that declare 8859/1 but send UTF-8 are
    common (the dcm4che sample messages do exactly that: ``8859/1`` with a UTF-8 en dash in OBR-31),
    and a genuine Latin-1 text with non-ASCII letters is practically never valid UTF-8, so the check
    does not misread real Latin-1 input. Undecodable bytes become U+FFFD rather than an error.
    """
    if data.startswith(BOM):
        data = data[len(BOM) :]
    head = data.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
    declared = _msh18(head)
    codec = CHARSETS.get(declared.upper(), "iso-8859-1")
    if codec == _UNFRAMEABLE:  # refused by ``parse``; read as UTF-8 so its MSH can be answered
        return data.decode("utf-8", errors="replace"), codec
    if declared.upper() in _UTF8_PREFERRED:
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            codec = "iso-8859-1"  # ASCII senders with 8-bit bytes mean Latin-1 in practice
    return data.decode(codec, errors="replace"), codec


def _msh18(msh_line: str) -> str:
    if not msh_line.startswith("MSH") or len(msh_line) < 4:
        return ""
    parts = msh_line.split(msh_line[3])
    # parts[0] is "MSH", parts[n-1] is MSH-n for n >= 2; MSH-18 may repeat: the first one governs.
    if len(parts) < 18:
        return ""
    rep = msh_line[5] if len(msh_line) > 5 else "~"
    return parts[17].split(rep)[0].strip()


def parse(data: bytes | str, max_segments: int = MAX_SEGMENTS) -> Message:
    """Parse one v2 message (chapter 2.5). Raises ``MappingError`` (rejecting it: AR) when it is unreadable.

    Unreadable: it does not start with an MSH segment, its delimiters (MSH-2) are missing or not
    distinct, a line is not a segment (``_unwrap``), or MSH-18 names a set that cannot travel
    over MLLP, or it has more than ``max_segments`` lines. :func:`header` still reads the MSH of
    such a message, to key and answer it.
    """
    text, charset = _text(data)
    lines = _lines(text)
    msh = _header_segment(lines)
    if len(lines) > max_segments:  # refused before any work that grows with them
        raise _unreadable("MSH", f"The message has {len(lines)} segments; at most {max_segments} are accepted")
    enc = _encoding(lines[0])
    if charset == _UNFRAMEABLE:
        raise _unreadable(
            "MSH-18", "UNICODE UTF-16 cannot travel over MLLP (its bytes may hold 0x0B or 0x1C): send UNICODE UTF-8"
        )
    segments = [msh]
    for n, line in enumerate(_unwrap(lines[1:], enc), start=2):
        parts = line.split(enc.field)
        name = parts[0].strip()
        if not _SEGMENT_NAME.match(name):
            raise _unreadable(f"segment {n}", f"{name[:20]!r} is not a segment name")
        segments.append(Segment(name, tuple(_field(p, enc) for p in parts[1:])))
    return Message(tuple(segments), enc, charset)


def header(data: bytes) -> Message | None:
    """The message's MSH alone (a Message of one segment), or None when even the MSH is unreadable.

    For answering and keying a message that :func:`parse` rejects for what follows its MSH.
    A message declaring UTF-16 is read as UTF-8 here: its ACK is sent in UTF-8 (see ``parse``).
    """
    try:
        text, charset = _text(data)
        lines = _lines(text)
        return Message((_header_segment(lines),), _encoding(lines[0]), "utf-8" if charset == _UNFRAMEABLE else charset)
    except MappingError:
        return None


def _text(data: bytes | str) -> tuple[str, str]:
    if isinstance(data, bytes):
        return decode(data)
    return data.removeprefix("\ufeff"), "str"


def _lines(text: str) -> list[str]:
    return [line for line in _SEGMENT_END.split(text) if line.strip()]


def _header_segment(lines: list[str]) -> Segment:
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise _unreadable("MSH", "The message does not start with an MSH segment", SEGMENT_SEQUENCE_ERROR)
    return _msh(lines[0], _encoding(lines[0]))


def _unreadable(location: str, text: str, code: int = DATA_TYPE_ERROR) -> MappingError:
    """A parse error: the message cannot be read, so it is rejected (AR), not its content (AE)."""
    return MappingError(code, location, text, rejects=True)


def _unwrap(lines: list[str], enc: Encoding) -> list[str]:
    """Join a line broken off a long segment back to it; any other line that is not a segment is an error.

    Some senders and transports break long segments, e.g. base64 data every 4,096 bytes
    (the dcm4che ORU_R01-PDF sample has such a CR). A segment always starts with its
    three-character name and the field separator. A line that does not, after a line of at
    least ``WRAP_WIDTH`` characters, is that line continued (the line end was not the
    sender's); after a shorter line it is no segment at all, and the message is refused
    (v2.5.1 §2.5.2: a segment ends with the CR), rather than glued onto a field it does not belong to.
    """
    joined: list[str] = []
    previous = ""
    for n, line in enumerate(lines, start=2):
        if joined and line[3:4] not in (enc.field, ""):
            if len(previous) < WRAP_WIDTH:
                raise _unreadable(f"segment {n}", f"Line {n} ({line[:20]!r}) is not a segment")
            joined[-1] += line
        else:
            joined.append(line)
        previous = line
    return joined


def _encoding(msh: str) -> Encoding:
    sep = msh[3]
    chars = msh[4:].split(sep, 1)[0]
    if not chars:  # the fields after it would be read shifted by one
        raise _unreadable("MSH-2", "MSH-2 (encoding characters) is empty")
    if len(chars) > 3 and chars[2] == chars[3]:
        # ``^~\\&``: a sender that escaped its own escape character in MSH-2; it means ``^~\&``.
        chars = chars[:3] + chars[4:]
    pick = [chars[i] if len(chars) > i else d for i, d in enumerate("^~\\&")]
    if len({sep, *pick}) != 5:
        raise _unreadable("MSH-2", f"Encoding characters {chars!r} are not five distinct characters")
    if any(not c.isprintable() or c.isspace() for c in (sep, *pick)):
        # A control character as a delimiter could not be mirrored into a framable ACK.
        raise _unreadable("MSH-2", f"Encoding characters {sep + chars!r} include a control character or space")
    return Encoding(sep, pick[0], pick[1], pick[2], pick[3])


def _msh(line: str, enc: Encoding) -> Segment:
    parts = line.split(enc.field)
    # MSH-1 is the separator itself and MSH-2 is taken literally (it holds the delimiters).
    literal = (Field((Repetition(((enc.field,),)),)), Field((Repetition(((parts[1],),)),)))
    return Segment("MSH", literal + tuple(_field(p, enc) for p in parts[2:]))


def _field(raw: str, enc: Encoding) -> Field:
    if raw == "":
        return EMPTY_FIELD
    return Field(
        tuple(
            Repetition(
                tuple(
                    tuple(unescape(s, enc) for s in comp.split(enc.subcomponent)) for comp in rep.split(enc.component)
                )
            )
            for rep in raw.split(enc.repetition)
        )
    )


def unescape(text: str, enc: Encoding) -> str:
    """Resolve the escape sequences of chapter 2.7 in one leaf value.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` become the delimiters, ``\\Xhh..\\`` the bytes it spells (read as
    Latin-1 unless they form UTF-8), ``\\.br\\`` a newline, the other formatting commands of 2.7.6 their
    plain-text form (``_formatting``); highlighting (``\\H\\ \\N\\``) is dropped; anything else (``\\Zxx\\``
    locally defined, ``\\Cxxyy\\``/``\\Mxxyyzz\\`` character set switches) is kept verbatim rather than lost.
    """
    esc = enc.escape
    if esc not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        end = text.find(esc, i + 1) if ch == esc else -1
        if end == -1:
            out.append(ch)
            i += 1
            continue
        seq = text[i + 1 : end]
        out.append(_escape_value(seq, enc, f"{esc}{seq}{esc}"))
        i = end + 1
    return "".join(out)


def _escape_value(seq: str, enc: Encoding, verbatim: str) -> str:
    simple = {"F": enc.field, "S": enc.component, "T": enc.subcomponent, "R": enc.repetition, "E": enc.escape}
    if seq in simple:
        return simple[seq]
    if seq in ("H", "N"):
        return ""
    if seq == ".br":
        return "\n"
    if seq[:1] == ".":
        return _formatting(seq, verbatim)
    if seq[:1] == "X" and len(seq) > 1 and len(seq) % 2 == 1:
        try:
            raw = bytes.fromhex(seq[1:])
        except ValueError:
            return verbatim
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return verbatim


def _formatting(seq: str, verbatim: str) -> str:
    """A formatting command of FT (2.7.6) as plain text: ``.sp n`` ends the line and skips n (1) lines,
    ``.in n``/``.ti n``/``.sk n`` indent or skip n spaces, ``.ce`` ends the line, ``.fi``/``.nf`` (fill
    mode) have no plain-text form and are dropped; an unknown or malformed command stays verbatim.
    Counts are capped at ``MAX_FORMAT_COUNT``: a 10-character escape must not become megabytes."""
    m = re.fullmatch(r"\.(sp|in|ti|sk|ce|fi|nf) *([+-]?\d{0,6})", seq)
    if m is None:
        return verbatim
    command, number = m.group(1), int(m.group(2)) if m.group(2).lstrip("+-") else None
    if command == "sp":
        return "\n" * (1 + min(1 if number is None else max(number, 0), MAX_FORMAT_COUNT))
    if command in ("in", "ti", "sk"):
        return " " * min(max(number or 0, 0), MAX_FORMAT_COUNT)
    return "\n" if command == "ce" else ""


def escape(text: str, enc: Encoding) -> str:
    """The inverse of ``unescape`` for the delimiters and line breaks (chapter 2.7.1)."""
    out = text.replace(enc.escape, f"{enc.escape}E{enc.escape}")
    for char, code in ((enc.field, "F"), (enc.component, "S"), (enc.subcomponent, "T"), (enc.repetition, "R")):
        out = out.replace(char, f"{enc.escape}{code}{enc.escape}")
    return out.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{enc.escape}.br{enc.escape}")


def encode_field(field: Field, enc: Encoding) -> str:
    """A parsed field as message text again, escaped with the message's delimiters."""
    return enc.repetition.join(
        enc.component.join(enc.subcomponent.join(escape(s, enc) for s in component) for component in rep.components)
        for rep in field.repetitions
    )
