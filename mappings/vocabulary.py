"""Code systems, namespaces and the IG's vocabulary maps that more than one mapping module uses."""

import uuid

#: The namespace of every uuid5 the mappings make (fullUrls, key identifiers): same message, same ids.
NAMESPACE = uuid.UUID("5b0f3c1e-8f4e-4d7a-9a51-0c6a2f4b7e10")
STUDY_UID_SYSTEM = "urn:dicom:uid"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
# Table 0001 administrative sex → AdministrativeGender (IG ``AdministrativeSex``).
GENDER = {"F": "female", "M": "male", "O": "other", "U": "unknown", "A": "other", "N": "other"}
# Table 0027 priority (TQ-6, TQ1-9, OBR-5) to request-priority (IG ExtendedPriorityCodes for S, A, R);
# P (pre-op) and T (timing critical) as urgent; codes without a FHIR peer (C, PRN) are left out.
PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "T": "urgent"}
#: OBX value types that are (part of) a report or a document, never an order detail.
REPORT_TYPES = frozenset({"TX", "FT", "ED", "RP"})
#: Table 0038 order status (ORC-5): where the placer says the order stands, as the case's Task.businessStatus.
ORDER_STATUS = "http://terminology.hl7.org/CodeSystem/v2-0038"
