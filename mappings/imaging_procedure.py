"""IPC (imaging procedure control, v2.5.1 4.5.6) → the order's ServiceRequest, beyond IPC-1 and IPC-3.

The V2-to-FHIR IG has no IPC map; the choices follow the IHE Radiology scheduled workflow, where
these values name the DICOM Modality Worklist item the order becomes:

- IPC-2 requested procedure id and IPC-4 scheduled procedure step id → ``identifier``, typed by text,
  in the sender's system (they are the RIS's ids, unique per order);
- IPC-5 modality and IPC-6 protocol code → ``orderDetail`` (a modality sent without a coding
  system is a DICOM modality code, ``DCM``);
- IPC-8 scheduled procedure step location, IPC-7 scheduled station name and IPC-9 its AE titles →
  ``locationCode`` (the names as text, the AE titles as codes of ``urn:overread:dicom-ae-title``).
"""

from __future__ import annotations

from mappings.bundle_builder import Builder
from mappings.order_group import OrderGroup
from mappings.v2_datatypes import Json, codeable_concept, coding_system

AE_TITLE_SYSTEM = "urn:overread:dicom-ae-title"


def add_procedure(b: Builder, group: OrderGroup, sr: Json) -> None:
    """Add what the order's first IPC says about the procedure to ``sr``."""
    ipc = group.first("IPC")
    if ipc is None:
        return
    for field_no, kind in ((2, "Requested Procedure ID"), (4, "Scheduled Procedure Step ID")):
        value = ipc.field(field_no).component(1)
        if value:
            sr["identifier"].append({"type": {"text": kind}, "system": b.fallback, "value": value})
    details = [c for rep in ipc.field(5).present() if (c := codeable_concept(rep))]
    for concept in details:
        if "coding" in concept:
            concept["coding"] = [{"system": coding_system("DCM"), **c} for c in concept["coding"]]
    details += [c for rep in ipc.field(6).present() if (c := codeable_concept(rep))]
    if details:
        sr["orderDetail"] = [*sr.get("orderDetail", []), *details]
    places = [c for rep in ipc.field(8).present() if (c := codeable_concept(rep))]
    station = ipc.field(7).component(1)
    if station:
        places.append({"text": station})
    places += [{"coding": [{"system": AE_TITLE_SYSTEM, "code": r.value}]} for r in ipc.field(9).present() if r.value]
    if places:
        sr["locationCode"] = [*sr.get("locationCode", []), *places]
