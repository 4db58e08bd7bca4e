"""The v2 parser (mappings.v2) against the encoding rules of v2.5.1 chapter 2."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mappings.errors import MappingError
from mappings.sender import SenderConfig
from mappings.v2 import WRAP_WIDTH, parse
from mappings.v2_datatypes import date, date_time, instant

MSH = r"MSH|^~\&|RIS|HOSP|OVR|OVR|20250101120000||ORM^O01|1|P|2.5.1"


def test_fields_components_repetitions_subcomponents_are_one_based():
    msg = parse(f"{MSH}\rPID|1||A^^^AUTH&1.2.3&ISO^MR~B^^^X||Doe^Jane\r".encode())
    pid = msg.segment("PID")
    assert pid is not None
    assert pid.field(1).value == "1"
    assert [r.component(1) for r in pid.field(3).repetitions] == ["A", "B"]
    assert pid.field(3).subcomponent(4, 2) == "1.2.3"
    assert pid.field(3).component(5) == "MR"
    assert pid.field(5).component(2) == "Jane"
    assert pid.field(99).value == "" and pid.field(99).is_empty()
    assert pid.field(3).component(42) == ""


def test_msh_1_and_2_are_the_delimiters_and_msh_9_is_field_9():
    msh = parse(MSH.encode()).msh
    assert msh.field(1).value == "|"
    assert msh.field(2).value == "^~\\&"
    assert msh.field(9).component(2) == "O01"
    assert parse(MSH.encode()).message_type == "ORM^O01"


def test_other_encoding_characters_are_honoured():
    msg = parse(b"MSH#*!@%#RIS#HOSP#OVR#OVR#20250101##ORM*O01#1#P#2.5.1\rPID#1##A***AUTH%1.2.3%ISO!B##Doe*Jo@F@ann")
    pid = msg.segment("PID")
    assert pid is not None
    assert pid.field(3).component(1) == "A"
    assert pid.field(3).subcomponent(4, 2) == "1.2.3"
    assert pid.field(3).repetitions[1].value == "B"
    assert pid.field(5).component(2) == "Jo#ann"  # \F\ with @ as the escape character


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
def test_segment_ends_cr_lf_crlf_and_a_bom(end):
    data = b"\xef\xbb\xbf" + end.join([MSH.encode(), b"PID|1", b"ZXY|kept|too", b""])
    msg = parse(data)
    assert [s.name for s in msg.segments()] == ["MSH", "PID", "ZXY"]
    assert msg.segments("ZXY")[0].field(2).value == "too"


def test_escape_sequences():
    msg = parse((MSH + "\r" + r"NTE|1||a\F\b\S\c\T\d\R\e\E\f\.br\g\X41C3A9\h\H\i\N\j\Zcustom\k").encode())
    nte = msg.segment("NTE")
    assert nte is not None
    assert nte.field(3).value == "a|b^c&d~e\\f\ng" + "A\u00e9" + "hij\\Zcustom\\k"


def test_charset_declared_8859_1_but_utf8_bytes_reads_utf8():
    data = (MSH + "||||||8859/1\rPID|1||X||M\u00fcller").encode("utf-8")
    msg = parse(data)
    assert msg.charset == "utf-8"
    assert msg.segment("PID").field(5).value == "M\u00fcller"  # type: ignore[union-attr]


def test_charset_real_latin1_bytes():
    data = (MSH + "||||||8859/1\rPID|1||X||M\u00fcller").encode("latin-1")
    msg = parse(data)
    assert msg.charset == "iso-8859-1"
    assert msg.segment("PID").field(5).value == "M\u00fcller"  # type: ignore[union-attr]


def test_charset_other_declared_set_wins():
    data = (MSH + "||||||8859/7\rPID|1||X||\u0391\u03b8\u03ae\u03bd\u03b1").encode("iso-8859-7")
    assert parse(data).segment("PID").field(5).value == "\u0391\u03b8\u03ae\u03bd\u03b1"  # type: ignore[union-attr]


@pytest.mark.parametrize("data", [b"", b"PID|1", b"garbage", b"MSH|"])
def test_not_a_message(data):
    with pytest.raises(MappingError) as info:
        parse(data)
    assert info.value.code == 100


def test_bad_segment_name():
    with pytest.raises(MappingError) as info:
        parse(f"{MSH}\rpid|1".encode())
    assert (info.value.code, info.value.location) == (102, "segment 2")


def test_date_times_keep_precision_and_gain_an_offset():
    utc, berlin = SenderConfig(), SenderConfig(timezone="Europe/Berlin")
    assert date_time("2025", utc, "X") == "2025"
    assert date_time("202503", utc, "X") == "2025-03"
    assert date_time("20250301", utc, "X") == "2025-03-01"
    assert date_time("202503011015", utc, "X") == "2025-03-01T10:15:00+00:00"
    assert date_time("20250701101500", berlin, "X") == "2025-07-01T10:15:00+02:00"
    assert date_time("20250301101500.123-0500", berlin, "X") == "2025-03-01T10:15:00.123-05:00"
    assert instant("20250301", utc, "X") == "2025-03-01T00:00:00+00:00"
    assert date("19700101120000", "PID-7") == "1970-01-01"
    with pytest.raises(MappingError) as info:
        date_time("2025-03-01", utc, "MSH-7")
    assert (info.value.code, info.value.location) == (102, "MSH-7")
    with pytest.raises(MappingError):
        instant("20251301", utc, "MSH-7")  # month 13


def test_assigning_authority_systems():
    config = SenderConfig(identifier_systems={"ADT1": "https://hospital.example/mrn"})
    assert config.system_for("ADT1") == "https://hospital.example/mrn"
    assert config.system_for("X", "1.2.3", "ISO") == "urn:oid:1.2.3"
    assert config.system_for("My Auth") == "urn:overread:assigning-authority:My%20Auth"
    assert config.system_for("") is None


def test_a_line_broken_off_a_long_segment_continues_it():
    base64 = "JVBERi0x" * 128  # a transport's fixed-width break inside OBX-5, as in the dcm4che PDF sample
    line = f"OBX|1|ED|PDF||^application^pdf^Base64^{base64}"
    assert len(line) >= WRAP_WIDTH
    message = parse(f"{MSH}\r{line}\rLjQK|\rNTE|1".encode())
    assert [s.name for s in message.segments()] == ["MSH", "OBX", "NTE"]
    assert message.segments("OBX")[0].field(5).component(5) == f"{base64}LjQK"


def test_a_line_that_is_not_a_segment_is_refused_not_glued_on():
    with pytest.raises(MappingError) as raised:
        parse(f"{MSH}\rPID|1||P1\rHELLO WORLD\rNTE|1".encode())
    assert (raised.value.code, raised.value.location, raised.value.rejects) == (102, "segment 3", True)
    assert raised.value.text == "Line 3 ('HELLO WORLD') is not a segment"


def test_a_doubled_escape_character_in_msh_2_is_the_escape_character():
    msg = parse(b"MSH|^~\\\\&|RIS|HOSP|OVR|OVR|20250101||ORM^O01|1|P|2.3\rPID|1||A^^^AUTH||Doe^Jo\\T\\ann")
    pid = msg.segment("PID")
    assert pid is not None
    assert (msg.encoding.escape, msg.encoding.subcomponent) == ("\\", "&")
    assert pid.field(5).component(2) == "Jo&ann"


@pytest.mark.parametrize("msh", ["MSH||~\\&|RIS||OVERREAD||20240101||ORM^O01|C1|P|2.3", "MSH|^~\x1c&|RIS|"])
def test_missing_or_control_delimiters_are_refused_at_msh_2(msh):
    with pytest.raises(MappingError) as raised:
        parse(msh.encode())
    assert (raised.value.code, raised.value.location) == (102, "MSH-2")


def test_a_mapping_error_passes_through_a_with_block_as_itself() -> None:
    """A transaction or a deadline (``@contextmanager``) sets ``__traceback__`` on the error it lets
    through: the error must take it and reach the caller as itself, not as a FrozenInstanceError."""

    @contextmanager
    def block() -> Iterator[None]:
        yield

    with pytest.raises(MappingError) as raised, block():
        raise MappingError(102, "PID-7", "not a date")
    assert (raised.value.code, raised.value.location) == (102, "PID-7")
