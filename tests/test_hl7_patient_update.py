"""A later message corrects the stored patient (docs/hl7-mapping.md, "Patients"): what it carries
replaces what is stored, what it leaves empty stays, and no identifier is ever removed."""

from typing import Any

from fhir_server.db import Database
from fhir_server.repository import Repository
from tests.hl7_golden import omi_order
from tests.intake import receive

FIRST = omi_order(1)
SYSTEM, VALUE = "urn:overread:assigning-authority:ADT1", "PID_1"
OTHER = {"system": "urn:oid:1.2.3.4", "value": "OTHER-SENDER-7"}


def _patient(db: Database) -> tuple[dict[str, Any], int]:
    with db.begin(write=False) as conn:
        (stored,) = Repository(conn).with_token("Patient", "identifier", SYSTEM, VALUE)
        return stored.resource, stored.version


def _corrected(n: int, pid: bytes) -> bytes:
    """The first order's patient in a new order (its own MSH-10 and placer number) with ``pid`` as PID."""
    lines = omi_order(n).split(b"\r")
    return b"\r".join(pid if line.startswith(b"PID|") else line for line in lines)


def test_a_later_message_corrects_the_demographics_and_keeps_other_senders_identifiers(db: Database):
    receive(db, FIRST)
    before, _ = _patient(db)
    assert (before["name"][0]["family"], before["birthDate"]) == ("Smith", "2014-10-14")
    with db.begin() as conn:  # another sender's id, added to the same patient
        repo = Repository(conn)
        repo.update("Patient", before["id"], {**before, "identifier": [*before["identifier"], OTHER]})
    receive(db, _corrected(2, b"PID|||PID_1^^^ADT1||Smyth^Lucy^Mark||20141015|F"))
    after, version = _patient(db)
    assert (after["name"][0]["family"], after["birthDate"], after["id"]) == ("Smyth", "2014-10-15", before["id"])
    assert OTHER in after["identifier"]
    assert after["address"] == before["address"]  # not sent in the correction: kept
    assert version == 3


def test_a_message_that_changes_nothing_writes_no_new_version(db: Database):
    receive(db, FIRST)
    receive(db, _corrected(2, next(line for line in FIRST.split(b"\r") if line.startswith(b"PID|"))))
    assert _patient(db)[1] == 1
