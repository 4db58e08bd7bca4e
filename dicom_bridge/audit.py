"""The AuditEvents of our Storage SCP (``fhir_server.balp``'s shape, DICOM PS3.15 A.5.3 codes).

- An association, accepted or rejected: DICOM "User Authentication" / "Login", action E,
  outcome 0 or 4 with the reason; the agent is the calling AE title and its address.
- What an association stored: one "DICOM Instances Transferred" event when it ends, action C,
  an entity per study (its Study Instance UID, instances kept), outcome 4 when a C-STORE failed.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fhir_server import balp
from mappings.vocabulary import STUDY_UID_SYSTEM

AE_TITLE = "https://overread.org/fhir/sid/dicom-ae-title"


def association(calling_ae: str | None, address: str, refusal: str | None, recorded: datetime) -> dict[str, Any]:
    """An association from ``calling_ae`` at ``address``: accepted, or rejected for ``refusal``."""
    kind, subtype = balp.coding(balp.DCM, "110114", "User Authentication"), [balp.coding(balp.DCM, "110122", "Login")]
    agent = balp.Agent(calling_ae or None, address, system=AE_TITLE)
    status = "0" if refusal is None else "4"
    return balp.event(kind, subtype, "E", recorded, status, refusal and f"rejected: {refusal}", agent, [])


@dataclass
class Transfer:
    """The C-STOREs of one association: instances kept by study, and those refused."""

    calling_ae: str
    address: str
    kept: Counter[str] = field(default_factory=Counter)
    failed: int = 0

    def event(self, recorded: datetime) -> dict[str, Any]:
        kind = balp.coding(balp.DCM, "110104", "DICOM Instances Transferred")
        failures = f"{self.failed} of {self.failed + self.kept.total()} C-STOREs failed" if self.failed else None
        entities = [
            {
                "what": {"identifier": {"system": STUDY_UID_SYSTEM, "value": f"urn:oid:{uid}"}},
                "type": balp.coding(balp.ENTITY_TYPE, "2", "System Object"),
                "role": balp.coding(balp.OBJECT_ROLE, "3", "Report"),
                "name": uid,
                "detail": [{"type": "instances", "valueString": str(count)}],
            }
            for uid, count in sorted(self.kept.items())
        ]
        agent = balp.Agent(self.calling_ae or None, self.address, system=AE_TITLE)
        return balp.event(kind, [], "C", recorded, "4" if self.failed else "0", failures, agent, entities)
