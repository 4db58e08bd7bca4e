"""The message store's REST endpoints: find messages, see their stages, replay one."""

import pytest

from hl7_bridge.store import STATUSES
from tests.hl7_golden import OMI, case_status, omi_control, omi_order
from tests.intake import receive


def test_list_filters_and_shows_each_stage(client, db):
    receive(db, OMI)
    receive(db, omi_order(7))
    receive(db, b"not HL7 at all")

    everything = client.get("/hl7/messages").json()
    assert [m["status"] for m in everything] == ["rejected", "processed", "processed"]  # newest first
    assert [m["control_id"] for m in client.get("/hl7/messages", params={"status": "processed"}).json()] == [
        "MSG0007", "1001125",
    ]  # fmt: skip
    assert [m["placer_number"] for m in client.get("/hl7/messages", params={"placer": "PLAC0007"}).json()] == [
        "PLAC0007"
    ]
    assert len(client.get("/hl7/messages", params={"sender": "MESA_OF"}).json()) == 2
    assert client.get("/hl7/messages", params={"control_id": "1001125"}).json()[0]["message_type"] == "OMI^O23"
    assert client.get("/hl7/messages", params={"since": "2999-01-01T00:00:00"}).json() == []

    first = everything[-1]
    detail = client.get(f"/hl7/messages/{first['id']}").json()
    assert detail["raw"].startswith("MSH|^~\\&|MESA_OF|XYZ_RADIOLOGY|")
    assert detail["bundle"]["type"] == "transaction"
    assert [e["response"]["status"] for e in detail["response"]["entry"]][:2] == ["201 Created", "201 Created"]
    assert "MSA|AA|1001125" in detail["ack"]
    assert client.get("/hl7/messages/999999").status_code == 404


def test_replay_processes_a_failed_message_again(client, db):
    receive(db, omi_control("CA", 1))  # a cancel that arrived before its order: AE, stored as error
    (failed,) = client.get("/hl7/messages", params={"status": "error"}).json()
    assert failed["ack_code"] == "AE"
    receive(db, OMI)  # the order arrives
    replayed = client.post(f"/hl7/messages/{failed['id']}/replay").json()
    assert replayed["status"] == "processed" and "MSA|AA|CTL0001" in replayed["ack"]
    assert case_status(db, "ServiceRequest")[0] == "revoked"
    assert client.get("/hl7/messages", params={"status": "error"}).json() == []
    assert client.post("/hl7/messages/999999/replay").status_code == 404


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"status": "bogus"}, "status: must be one of received, processed, error, rejected, refused (got 'bogus')"),
        ({"since": "yesterday"}, "since: not a FHIR dateTime: 'yesterday' is not a FHIR date"),
        ({"until": "2026-13-01"}, "until: not a FHIR dateTime: month must be in 1..12 (got '2026-13-01')"),
        ({"limit": "-1"}, "limit: Input should be greater than or equal to 1 (got '-1')"),
        ({"limit": "many"}, "limit: Input should be a valid integer"),
        ({"offset": "-5"}, "offset: Input should be greater than or equal to 0 (got '-5')"),
    ],
)
def test_a_filter_value_it_cannot_use_is_a_bad_request(client, db, params, says):
    receive(db, OMI)
    response = client.get("/hl7/messages", params=params)
    assert response.status_code == 400
    assert says in response.json()["detail"]


def test_each_known_status_is_a_filter(client, db):
    receive(db, OMI)
    for status in STATUSES:
        response = client.get("/hl7/messages", params={"status": status})
        assert response.status_code == 200
        assert [m["status"] for m in response.json()] == (["processed"] if status == "processed" else [])


def test_a_refused_message_names_the_one_whose_control_id_it_reused(client, db):
    receive(db, OMI)
    receive(db, OMI.replace(b"PID_1^", b"PID_2^"))
    refused, first = client.get("/hl7/messages").json()
    assert (refused["status"], refused["conflict_of"], refused["ack_code"]) == ("refused", first["id"], "AE")
    assert client.get("/hl7/messages", params={"status": "refused"}).json() == [refused]
    assert f"already used by message #{first['id']}" in client.get(f"/hl7/messages/{refused['id']}").json()["ack"]


@pytest.mark.parametrize(
    ("method", "path", "says"),
    [
        ("GET", f"/hl7/messages?offset={2**63}", "offset: Input should be less than or equal to"),
        ("GET", f"/hl7/messages?offset={2**31}", "offset: Input should be less than or equal to"),
        ("GET", f"/hl7/outbound?offset={2**63}", "offset: Input should be less than or equal to"),
        ("GET", f"/hl7/messages?limit={2**63}", "limit: Input should be less than or equal to 500"),
        ("GET", f"/hl7/messages/{2**63}", "message_id: Input should be less than or equal to"),
        ("GET", f"/hl7/messages/{-(2**63) - 1}", "message_id: Input should be greater than or equal to 1"),
        ("POST", f"/hl7/messages/{2**63}/replay", "message_id: Input should be less than or equal to"),
        ("GET", f"/hl7/outbound/{2**63}", "message_id: Input should be less than or equal to"),
        ("POST", f"/hl7/outbound/{2**64}/replay", "message_id: Input should be less than or equal to"),
        ("GET", "/hl7/messages/%C2%B2", "message_id: Input should be a valid integer"),
    ],
)
def test_a_number_past_what_the_store_holds_is_a_bad_request(client, db, method, path, says):
    receive(db, OMI)
    response = client.request(method, path)
    assert response.status_code == 400, response.text
    assert says in response.json()["detail"]


def test_the_largest_numbers_the_store_holds_are_answered(client, db):
    receive(db, OMI)
    assert client.get("/hl7/messages", params={"offset": 2**31 - 1}).json() == []
    assert client.get("/hl7/outbound", params={"offset": 2**31 - 1}).json() == []
    assert client.get(f"/hl7/messages/{2**63 - 1}").status_code == 404
    assert client.get(f"/hl7/outbound/{2**63 - 1}").status_code == 404
