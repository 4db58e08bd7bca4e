"""HL7 null (``""``): "delete the value", never the two-character text.

v2.5.1 chapter 2.5.3: a field (or component) sent as ``""`` means the receiver must delete what it
holds there, as opposed to an empty field, which means "no change". Every order and report Overread
maps becomes a whole resource (a create, or for XO a conditional update that replaces the order), so
for both a null is simply no value: ``without_nulls`` turns each ``""`` into an empty value before any
mapping reads the message, which makes the rule hold in every data type at once (an accession ``""``,
a Practitioner id ``""``, a birth date ``""`` alike).
"""

from __future__ import annotations

from mappings.v2 import Field, Message, Repetition, Segment

HL7_NULL = '""'


def without_nulls(msg: Message) -> Message:
    """``msg`` with every ``""`` leaf empty; MSH-1 and MSH-2 (the delimiters) as they are."""
    if not any(_has_null(field) for seg in msg.all_segments for field in seg.fields):
        return msg
    segments = [_segment(seg) for seg in msg.all_segments]
    msh = msg.all_segments[0]
    segments[0] = Segment(msh.name, msh.fields[:2] + segments[0].fields[2:])
    return Message(tuple(segments), msg.encoding, msg.charset)


def _has_null(field: Field) -> bool:
    return any(leaf == HL7_NULL for rep in field.repetitions for comp in rep.components for leaf in comp)


def _segment(seg: Segment) -> Segment:
    return Segment(seg.name, tuple(_field(f) if _has_null(f) else f for f in seg.fields))


def _field(field: Field) -> Field:
    return Field(
        tuple(
            Repetition(tuple(tuple("" if leaf == HL7_NULL else leaf for leaf in comp) for comp in rep.components))
            for rep in field.repetitions
        )
    )
