"""The original report: ORU^R01 (or report OBX lines in an order) → a DiagnosticReport linked to its case."""

import base64
import json
from typing import Any

import hl7
import pytest

from fhir_server.db import Database
from fhir_server.repository import Repository, Stored
from mappings.errors import MappingError
from mappings.orders import map_message
from mappings.original_report import ORIGINAL_TAG
from mappings.v2 import parse
from overread.app import default_hooks
from tests.hl7_golden import DCM4CHE, GOLDEN, OMI
from tests.intake import receive

Json = dict[str, Any]
ORU_PDF = (DCM4CHE / "ORU_R01-PDF.hl7").read_bytes()
ORU_SR = (DCM4CHE / "ORU_R01-SR.hl7").read_bytes()


def _golden(name: str) -> Json:
    result: Json = json.loads((GOLDEN / name).read_text(encoding="utf-8"))
    return result


def _reports(bundle: Json) -> list[Json]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]


def _text(report: Json) -> str:
    (form,) = [f for f in report["presentedForm"] if f["contentType"] == "text/plain; charset=utf-8"]
    return base64.b64decode(form["data"]).decode("utf-8")


def _identifier(resource: Json, code: str) -> str:
    (value,) = [
        i["value"] for i in resource["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == code
    ]
    return str(value)


# -- mapping (pure) --------------------------------------------------------------------------


def test_the_pdf_report_keeps_the_pdf_and_the_order_numbers():
    (report,) = _reports(_golden("dcm4che-ORU_R01-PDF.json"))
    assert report["meta"]["tag"] == [ORIGINAL_TAG]
    assert (report["status"], report["category"][0]["coding"][0]["code"]) == ("final", "RAD")
    assert [_identifier(report, c) for c in ("PLAC", "FILL", "ACSN")] == [
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
        "AccessionNumber",
    ]
    assert "basedOn" not in report  # linked by the store once the order is there
    (pdf,) = report["presentedForm"]  # the DICOM UID lines are references, not report text
    assert pdf["contentType"] == "application/pdf"
    data = base64.b64decode(pdf["data"], validate=True)
    assert data.startswith(b"%PDF-1.3") and data.rstrip().endswith(b"%%EOF")
    assert report["contained"][0]["name"][0]["family"] == "VerifyingObserverFN"
    assert report["resultsInterpreter"] == [{"reference": "#interpreter"}]


def test_the_dcm4che_pdf_fixture_breaks_its_segment_with_a_bare_cr_and_still_maps():
    assert b"\rA0KJSVFT0YNCg==" in ORU_PDF  # the stray CR in the base64 of OBX-5
    assert "error" not in _golden("dcm4che-ORU_R01-PDF.json")


def test_the_cda_report_is_the_xml_document_unchanged():
    (report,) = _reports(_golden("dcm4che-ORU_R01-CDA.json"))
    (cda,) = report["presentedForm"]
    assert cda["contentType"] == "text/xml"
    xml = base64.b64decode(cda["data"]).decode("utf-8")
    # the XML's & were subcomponent separators to the parser: the data is joined again
    assert xml.startswith('<?xml version="1.0"') and xml.endswith("</ClinicalDocument>")
    (line,) = [s for s in (DCM4CHE / "ORU_R01-CDA.hl7").read_bytes().splitlines() if s.startswith(b"OBX|5|ED|")]
    assert xml.count("&") == line.count(b"&") == 20


def test_the_structured_report_becomes_text_with_headings():
    (report,) = _reports(_golden("dcm4che-ORU_R01-SR.json"))
    text = _text(report)
    assert text.startswith("Procedure Findings:\nThe right kidney is slightly enlarged, but otherwise normal\n")
    assert "Renal Mass:\nMalignant neoplasm of left renal pelvis\n" in text
    assert "1.2.392.200036" not in text
    assert "conclusion" not in report  # long and without an impression


def test_free_text_escapes_impression_pointer_and_two_reports():
    first, second = _reports(_golden("oru_tx_escapes_rp.json"))
    assert _text(first) == (
        "Findings:\nLungs clear.\nHeart size normal | no effusion.\nCaf\u00e9 & ^ ~ \\ literal\n"
        "Impression:\nNo acute finding.\nPreliminary: awaiting comparison"
    )
    assert first["conclusion"] == "No acute finding.\nPreliminary: awaiting comparison"
    assert (first["status"], first["category"][0]["coding"][0]["code"]) == ("preliminary", "CT")
    assert first["issued"] == "2025-03-01T11:30:00+01:00"
    assert first["presentedForm"][1] == {
        "contentType": "application/pdf",
        "url": "https://ris.example.org/wado/reports/ACC-77.pdf",
        "title": "Diagnostic imaging report",
    }
    assert first["resultsInterpreter"][0]["reference"].startswith("urn:uuid:")  # an identified Practitioner
    assert (second["status"], _identifier(second, "ACSN")) == ("final", "ACC-78")
    assert second["effectivePeriod"]["end"] == "2025-03-01T09:45:00+00:00"
    assert first["identifier"][0] != second["identifier"][0]
    assert _golden("oru_unmapped_result_status.json")["error"]["location"] == "OBR-25"


def test_an_order_with_report_lines_carries_its_original_report():
    bundle = _golden("orm_original_report.json")
    (report,) = _reports(bundle)
    (order,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert report["basedOn"] == [{"reference": order["fullUrl"]}]
    assert report["code"] == order["resource"]["code"]
    text = _text(report)
    assert "Body weight" not in text and "70" not in text  # an order detail, not the report
    assert "Nodule 6 mm | right upper lobe\nNo effusion ^ no adenopathy, caf\u00e9 \\ done\nDictated" in text
    assert report["conclusion"] == "Solitary 6 mm nodule; follow-up CT in 6 months."
    assert base64.b64decode(report["presentedForm"][1]["data"]).startswith(b"%PDF")


@pytest.mark.parametrize("name", ["dcm4che-OMI_O23-ImagingOrder.json", "dcm4che-ORM_O01-GeneralOrder.json"])
def test_order_details_in_obx_make_no_report(name: str):
    assert _reports(_golden(name)) == []


def test_broken_base64_is_a_data_type_error():
    broken = ORU_PDF.replace(b"^Base64^JVBERi0x", b"^Base64^!!!JVBERi0x")
    with pytest.raises(MappingError) as raised:
        map_message(parse(broken))
    assert (raised.value.code, raised.value.location) == (102, "OBX[4]-5")


# -- intake: both orders of arrival, on both databases ---------------------------------------


def _receive(db: Database, raw: bytes) -> bytes:
    """One message through the intake with the case rules hooked, as the server runs it; the ACK."""
    return receive(db, raw, hooks=default_hooks())


def _msa(ack: bytes) -> tuple[str, str, str]:
    parsed = hl7.parse(ack.decode())
    msa = parsed.segment("MSA")
    return str(msa[1]), str(msa[2]), str(parsed.segment("MSH")[9])


def _find(db: Database, rtype: str, *params: tuple[str, str]) -> list[Stored]:
    with db.begin(write=False) as conn:
        return Repository(conn).search(rtype, params)


def _order_id(db: Database) -> str:
    (order,) = _find(db, "ServiceRequest")
    return order.id


def _linked_reports(db: Database) -> list[Stored]:
    return _find(db, "DiagnosticReport", ("based-on", f"ServiceRequest/{_order_id(db)}"))


def test_report_first_then_order_links_the_report_to_the_case(db: Database):
    assert _msa(_receive(db, ORU_PDF)) == ("AA", "1001128", "ACK^R01^ACK")
    (report,) = _find(db, "DiagnosticReport")
    assert "basedOn" not in report.resource
    assert _msa(_receive(db, OMI))[0] == "AA"
    (linked,) = _linked_reports(db)
    assert linked.id == report.id and linked.version == 2
    pdf = base64.b64decode(linked.resource["presentedForm"][0]["data"])
    assert pdf.startswith(b"%PDF-1.3")
    (task,) = _find(db, "Task", ("focus", f"ServiceRequest/{_order_id(db)}"))  # the case finds its report
    assert task.resource["status"] == "requested"


def test_order_first_then_report_links_at_once(db: Database):
    _receive(db, OMI)
    assert _msa(_receive(db, ORU_SR))[0] == "AA"
    (linked,) = _linked_reports(db)
    assert linked.version == 2 and linked.resource["meta"]["tag"][0]["code"] == "original"
    assert linked.resource["subject"] == _find(db, "ServiceRequest")[0].resource["subject"]


def test_a_resent_report_gets_the_same_ack_and_changes_nothing(db: Database):
    first = _receive(db, ORU_PDF)
    assert _receive(db, ORU_PDF) == first
    assert (len(_find(db, "DiagnosticReport")), len(_find(db, "Patient")), len(_find(db, "Provenance"))) == (1, 1, 1)


def test_a_corrected_report_replaces_the_original_and_stays_linked(db: Database):
    _receive(db, OMI)
    _receive(db, ORU_PDF)
    corrected = ORU_PDF.replace(b"|1001128|", b"|1001199|").replace(
        b"||||||F|||||||&Verifying", b"||||||C|||||||&Verifying"
    )
    assert corrected.count(b"|C|") == 1
    assert _msa(_receive(db, corrected))[0] == "AA"
    (report,) = _find(db, "DiagnosticReport")
    assert report.resource["status"] == "corrected"
    assert [r.id for r in _linked_reports(db)] == [report.id]


def test_a_report_of_another_patient_is_never_linked(db: Database):
    _receive(db, OMI)
    other = ORU_PDF.replace(b"PID_1^^^ADT1", b"PID_9^^^ADT1")
    assert _msa(_receive(db, other))[0] == "AA"
    assert len(_find(db, "DiagnosticReport")) == 1 and _linked_reports(db) == []


def test_an_order_with_its_report_lines_links_through_the_bundle(db: Database):
    raw = (GOLDEN / "orm_original_report.hl7").read_bytes()
    assert _msa(_receive(db, raw))[0] == "AA"
    (linked,) = _linked_reports(db)
    assert linked.version == 1  # basedOn came with the Bundle, not from the store's linking


def test_other_message_types_are_still_refused(db: Database):
    omg = (DCM4CHE / "OMG_O19-GeneralClinicalOrder-Eyecare.hl7").read_bytes()
    ack = _receive(db, omg)
    assert _msa(ack)[0] == "AR" and str(hl7.parse(ack.decode()).segment("ERR")[3]).startswith("200")
    assert _find(db, "DiagnosticReport") == []


def test_unescaped_separators_in_nte_and_ascii_ed_are_kept():
    oru = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|OVR|OVR|20250301||ORU^R01|M1|P|2.5.1",
            "PID|||P1^^^HOSP||Doe^Jane",
            "OBR|1|PL1|FL1|CT^CT chest|||20250301" + "|" * 18 + "F",
            "OBX|1|TX|RPT^Report||Line one",
            "NTE|1||Note with caret ^ inside & amp",
            "OBX|2|ED|DOC^Doc||^TEXT^plain^A^a~b ^ c",
        ]
    ).encode()
    (report,) = _reports(map_message(parse(oru)))
    assert _text(report) == "Line one\nNote with caret ^ inside & amp"
    assert base64.b64decode(report["presentedForm"][1]["data"]) == b"a~b ^ c"


def test_a_report_of_the_same_patient_from_another_identifier_domain_is_linked_by_demographics(db: Database):
    """The patient match of image linking (cases.patient_match, strict): no identifier in common,
    so name, birth date and sex decide; the report's Patient is a resource of its own."""
    _receive(db, OMI)
    elsewhere = ORU_PDF.replace(b"PID_1^^^ADT1", b"P-77^^^OTHERSITE")
    assert _msa(_receive(db, elsewhere))[0] == "AA"
    assert len(_find(db, "Patient")) == 2
    (linked,) = _linked_reports(db)
    assert linked.resource["subject"] != _find(db, "ServiceRequest")[0].resource["subject"]


def test_a_report_with_the_accession_but_another_birth_date_is_not_linked(db: Database):
    _receive(db, OMI)
    other = ORU_PDF.replace(b"PID_1^^^ADT1", b"P-77^^^OTHERSITE").replace(b"|20141014|F|", b"|20141015|F|")
    assert other.count(b"|20141015|F|") == 1
    assert _msa(_receive(db, other))[0] == "AA"
    assert len(_find(db, "DiagnosticReport")) == 1 and _linked_reports(db) == []
