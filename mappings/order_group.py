"""Where an order's parts sit in an order message: one ORC and the segments after it (v2.5.1 4.4.1, 4.4.5)."""

from __future__ import annotations

from dataclasses import dataclass

from mappings.v2 import Message, Segment


@dataclass(frozen=True)
class OrderGroup:
    """One ORC and the segments up to the next ORC (TQ1, OBR, NTE, OBX, IPC, DG1, Z-segments)."""

    orc: Segment
    members: tuple[Segment, ...]

    def first(self, name: str) -> Segment | None:
        return next((s for s in self.members if s.name == name), None)

    def all(self, name: str) -> tuple[Segment, ...]:
        return tuple(s for s in self.members if s.name == name)


def order_groups(msg: Message) -> list[OrderGroup]:
    """Split the message at each ORC; one pass, each segment appended once (linear in the segments)."""
    starts = [i for i, seg in enumerate(msg.all_segments) if seg.name == "ORC"]
    ends = [*starts[1:], len(msg.all_segments)]
    return [OrderGroup(msg.all_segments[i], msg.all_segments[i + 1 : end]) for i, end in zip(starts, ends, strict=True)]


def study_uid_from_zds(msg: Message) -> str:
    """ZDS-1.1: the Study Instance UID in the dcm4che / IHE SWF convention."""
    zds = msg.segment("ZDS")
    return zds.field(1).component(1) if zds else ""
