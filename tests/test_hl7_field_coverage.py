"""docs/hl7-mapping.md's field table is what the order mapping does, and how much of the IG it carries.

Each row of the table is probed: its "Sent" value is put in that field of a plain order, the order is
mapped, and its "Becomes" value must be found at the row's FHIR path. The rows are then counted against
the IG's segment maps (``tests/fixtures/v2-to-fhir/*.csv``, HL7/v2-to-fhir at 8c9b414b): the fields the
IG maps that no row carries are printed (run with ``-s``), and the share carried may not fall.
"""

import csv
import re
from pathlib import Path
from typing import Any

import pytest

from fhir_server.validation import validate
from mappings.orders import map_message
from mappings.v2 import parse

ROOT = Path(__file__).parent.parent
TABLE = ROOT / "docs" / "hl7-mapping.md"
IG = Path(__file__).parent / "fixtures" / "v2-to-fhir"
#: The share of the IG-mapped fields of these segments the table carries, measured; raise it as rows come.
CARRIED_AT_LEAST = 0.93
BASE = [
    "MSH|^~\\&|RIS|FAC|O|O|20250101120000||ORM^O01|PROBE-1|P|2.5.1",
    "PID|1||P-BASE^^^FAC^MR||Base^Pat||19700101|F",
    "PD1|",
    "PV1|1|O",
    "PV2|",
    "IN1|1||INS-BASE^^^FAC|Base payor",
    "AL1|1|DA|BASEALG^Base allergen^L",
    "ORC|NW|PL-BASE|||SC",
    "TQ1|1",
    "OBR|1|PL-BASE||BASECODE^Base code^L",
    "IPC|",
    "NTE|1||Base order note",
    "DG1|1|I10|BASEDG^Base diagnosis^I10",
    "OBX|1|NM|BASEOBX^Base observation^L||1|||||||F",
    "NTE|1||Base observation note",
]
_PLACE = re.compile(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?-(\d+)(?:\.(\d+))?$")


def _rows() -> list[dict[str, str]]:
    text = TABLE.read_text(encoding="utf-8")
    table = text.split("<!-- fields: begin -->", 1)[1].split("<!-- fields: end -->", 1)[0]
    lines = [line for line in table.strip().splitlines()[2:] if line.startswith("|")]
    keys = ("field", "fhir", "sent", "becomes", "also")
    return [dict(zip(keys, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines]


def _set(lines: list[str], place: str, value: str) -> list[str]:
    """``lines`` with ``value`` in ``SEG[k]-n.m`` (the whole field without ``.m``)."""
    m = _PLACE.match(place)
    assert m, place
    name, nth, field_no, component = m.group(1), int(m.group(2) or 1), int(m.group(3)), m.group(4)
    at = [i for i, line in enumerate(lines) if line.startswith(name + "|")][nth - 1]
    fields = lines[at].split("|")
    fields += [""] * (field_no + 1 - len(fields))
    if component:
        parts = fields[field_no].split("^")
        parts += [""] * (int(component) - len(parts))
        parts[int(component) - 1] = value
        value = "^".join(parts)
    fields[field_no] = value
    return [*lines[:at], "|".join(fields), *lines[at + 1 :]]


def _values(node: Any, path: list[str]) -> list[Any]:
    if isinstance(node, list):
        return [v for item in node for v in _values(item, path)]
    if not path:
        return [node]
    return _values(node[path[0]], path[1:]) if isinstance(node, dict) and path[0] in node else []


ROWS = _rows()


@pytest.mark.parametrize("row", ROWS, ids=[r["field"] for r in ROWS])
def test_each_documented_field_lands_where_the_table_says(row: dict[str, str]):
    lines = _set(BASE, row["field"], row["sent"])
    for assignment in filter(None, (a.strip() for a in row["also"].split(";"))):
        place, _, value = assignment.partition("=")
        lines = _set(lines, place, value)
    bundle = map_message(parse("\r".join(lines)))
    rtype, *path = row["fhir"].split(".")
    resources = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]
    found = [str(v) for v in _values(resources, path)]
    assert row["becomes"] in found, f"{row['field']} {row['sent']!r}: {row['fhir']} holds {found}"
    for entry in bundle["entry"]:
        validate(entry["resource"])  # valid R4 with the field set, as the store checks it


def _ig_fields() -> dict[str, set[str]]:
    """The fields each IG segment map maps (a FHIR attribute on the row), by segment."""
    fields: dict[str, set[str]] = {}
    for path in sorted(IG.glob("*.csv")):
        with path.open(encoding="utf-8") as handle:
            rows = list(csv.reader(handle))[2:]
        ids = {r[1] for r in rows if len(r) > 9 and r[9].strip() and re.fullmatch(r"[A-Z0-9]{3}-\d+", r[1])}
        fields[path.stem] = ids
    return fields


def test_the_table_carries_its_share_of_the_fields_the_ig_maps(capsys: pytest.CaptureFixture[str]):
    carried = {re.sub(r"\[\d+\]", "", r["field"]).split(".")[0] for r in ROWS}
    ig = _ig_fields()
    mapped = set().union(*ig.values())
    share = len(mapped & carried) / len(mapped)
    with capsys.disabled():
        print(f"\nIG-mapped fields carried: {len(mapped & carried)} of {len(mapped)} ({share:.0%})")
        for segment_map, ids in ig.items():
            missing = sorted(ids - carried, key=lambda f: int(f.split("-")[1]))
            print(f"  {segment_map}: not carried (no mapping yet): {' '.join(missing) or '-'}")
    assert share >= CARRIED_AT_LEAST
