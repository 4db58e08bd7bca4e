def test_metadata_is_r4(client):
    r = client.get("/fhir/metadata")
    assert r.status_code == 200
    assert r.json()["fhirVersion"] == "4.0.1"
