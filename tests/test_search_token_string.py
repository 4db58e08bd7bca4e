"""Token, string and uri search (R4 search.html#token, #string, #uri), `_id`, AND/OR, modifiers.

Runs read-only queries against the radiology store of ``tests/search_data.py``, loaded once
per database; every case names the exact ids it must return.
"""

import pytest

from tests.search_data import (
    MRN,
    assert_outcome,
    found,
    patient,
    put,
    search,
    typed_identifier,
)

ALL_PATIENTS = {"pat-muller", "pat-muller2", "pat-obermuller", "pat-smith"}
ALL_ORDERS = {"sr-1", "sr-2", "sr-3", "sr-4"}


# -- token -------------------------------------------------------------------------------

TOKEN_CASES = [
    # system|code: only codings of that system
    ("ServiceRequest?code=http://loinc.org|24627-2", {"sr-1", "sr-4"}),
    ("ServiceRequest?code=http://www.radlex.org|RPID16", {"sr-1", "sr-4"}),
    ("ServiceRequest?code=http://loinc.org|RPID16", set()),
    # code alone: any system, or none
    ("ServiceRequest?code=24627-2", {"sr-1", "sr-4"}),
    ("ServiceRequest?code=LOCAL-MRB", {"sr-3"}),
    # |code: only codings without a system
    ("ServiceRequest?code=|LOCAL-MRB", {"sr-3"}),
    ("ServiceRequest?code=|RPID145", set()),
    # system|: any code of that system
    ("ServiceRequest?code=http://loinc.org|", {"sr-1", "sr-2", "sr-4"}),
    ("ServiceRequest?code=http://www.radlex.org|", {"sr-1", "sr-3", "sr-4"}),
    # identifiers typed ACSN / PLAC (HL7 table 0203): the value is the code
    ("ServiceRequest?identifier=http://hospital.example.org/accession|ACC-24-0002", {"sr-2"}),
    ("ServiceRequest?identifier=ACC-24-0002", {"sr-2"}),
    ("ServiceRequest?identifier=http://ehr.example.org/orders|PLAC-9001", {"sr-1"}),
    ("ServiceRequest?identifier=http://hospital.example.org/accession|PLAC-9001", set()),
    ("ServiceRequest?identifier=http://hospital.example.org/accession|", ALL_ORDERS),
    # the same MRN value in two hospitals' systems
    ("Patient?identifier=http://hospital.example.org/mrn|MRN-1001", {"pat-muller"}),
    ("Patient?identifier=http://other-hospital.example.org/mrn|MRN-1001", {"pat-smith"}),
    ("Patient?identifier=MRN-1001", {"pat-muller", "pat-smith"}),
    ("Patient?identifier=|LEGACY-7", {"pat-obermuller"}),
    ("Patient?identifier=|MRN-1003", set()),
    ("Patient?identifier=http://hospital.example.org/mrn|", ALL_PATIENTS),
    # code, boolean and ContactPoint tokens
    ("Patient?gender=female", {"pat-muller", "pat-obermuller"}),
    ("Patient?active=true", {"pat-muller"}),
    ("Patient?active=false", {"pat-muller2"}),
    ("Patient?phone=%2B41%2044%20123%2045%2067", {"pat-muller"}),
    ("Task?business-status=https://overread.org/fhir/CodeSystem/case-status|reported", {"task-2"}),
    ("ImagingStudy?modality=http://dicom.nema.org/resources/ontology/DCM|MR", {"is-3"}),
    ("ImagingStudy?identifier=urn:dicom:uid|urn:oid:1.2.840.113619.2.55.3.1003", {"is-3"}),
    ("ImagingStudy?series=1.2.840.113619.2.55.3.1001.2", {"is-1"}),
    # discrepancy and RADPEER codes side by side in conclusionCode
    ("DiagnosticReport?conclusion=https://overread.org/fhir/CodeSystem/second-opinion-discrepancy|major", {"dr-1"}),
    ("DiagnosticReport?conclusion=https://overread.org/fhir/CodeSystem/radpeer|3b", {"dr-1"}),
    ("DiagnosticReport?conclusion=https://overread.org/fhir/CodeSystem/radpeer|1", set()),
    # meta: _tag is a token, _source a uri
    ("ServiceRequest?_tag=https://overread.org/fhir/CodeSystem/order-origin|hl7v2", {"sr-2"}),
    ("ServiceRequest?_tag:not=hl7v2", {"sr-1", "sr-3", "sr-4"}),
    ("ServiceRequest?_source=urn:overread:hl7v2:EHR1", {"sr-2"}),
    ("Patient?deceased=false", ALL_PATIENTS),
    ("Patient?deceased=true", set()),
    # tokens compare exactly: no prefix match, case matters
    ("ServiceRequest?identifier=ACC-24", set()),
    ("ServiceRequest?status=ACTIVE", set()),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), TOKEN_CASES, ids=[q for q, _ in TOKEN_CASES])
def test_token_forms(store, query, expected):
    assert found(store, query) == expected


NOT_AND_MISSING = [
    # :not also matches resources that have no value at all (search.html#modifiers)
    ("ServiceRequest?status:not=active", {"sr-2", "sr-4"}),
    ("ServiceRequest?priority:not=stat", {"sr-1", "sr-3", "sr-4"}),
    ("ServiceRequest?status:not=active,revoked", {"sr-2"}),
    ("ServiceRequest?code:not=http://loinc.org|24627-2", {"sr-2", "sr-3"}),
    ("Patient?active:not=true", {"pat-muller2", "pat-obermuller", "pat-smith"}),
    # :missing on every parameter type
    ("ServiceRequest?priority:missing=true", {"sr-4"}),
    ("ServiceRequest?priority:missing=false", {"sr-1", "sr-2", "sr-3"}),
    ("Patient?active:missing=true", {"pat-obermuller", "pat-smith"}),
    ("Patient?address:missing=true", {"pat-obermuller", "pat-smith"}),
    ("Task?period:missing=true", {"task-3"}),
    ("ServiceRequest?requester:missing=true", {"sr-4"}),
    ("ServiceRequest?requester:missing=false", {"sr-1", "sr-2", "sr-3"}),
    ("ImagingStudy?endpoint:missing=true", {"is-2"}),
    ("Observation?value-quantity:missing=false", {"obs-1", "obs-2", "obs-3", "obs-4", "obs-5", "obs-6"}),
    ("ServiceRequest?instantiates-uri:missing=false", {"sr-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), NOT_AND_MISSING, ids=[q for q, _ in NOT_AND_MISSING])
def test_not_and_missing_modifiers(store, query, expected):
    assert found(store, query) == expected


AND_OR = [
    # comma: OR of values; repeated parameter: AND (search.html#combining)
    ("ServiceRequest?status=active,completed", {"sr-1", "sr-2", "sr-3"}),
    ("ServiceRequest?code=http://loinc.org|24627-2&status=active", {"sr-1"}),
    ("ServiceRequest?code=http://loinc.org|24627-2,http://loinc.org|36643-5&status=completed,revoked",
     {"sr-2", "sr-4"}),
    ("ImagingStudy?modality=CT&modality=SR", {"is-1"}),
    ("ImagingStudy?modality=CT&modality=DX", set()),
    ("ImagingStudy?modality=CT,DX", {"is-1", "is-2"}),
    ("Patient?family=mull&given=johann", {"pat-muller2"}),
    ("Patient?family=smith,obermuller", {"pat-smith", "pat-obermuller"}),
    ("Task?owner=Practitioner/rad-1&status=requested,in-progress&status:not=requested", {"task-3"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), AND_OR, ids=[q for q, _ in AND_OR])
def test_repeated_parameters_are_anded_and_comma_values_ored(store, query, expected):
    assert found(store, query) == expected


def test_id_matches_exactly_and_ors_on_commas(store):
    assert found(store, "ServiceRequest?_id=sr-1,sr-3") == {"sr-1", "sr-3"}
    assert found(store, "ServiceRequest?_id=sr") == set()
    assert found(store, "ServiceRequest?_id=pat-muller") == set()  # an id of another type
    assert found(store, "ServiceRequest?_id=sr-1&_id=sr-1,sr-2") == {"sr-1"}
    assert found(store, "ServiceRequest?_id:not=sr-1,sr-4") == {"sr-2", "sr-3"}
    assert found(store, "ServiceRequest?_id:missing=true") == set()
    assert found(store, "ServiceRequest?_id:missing=false") == ALL_ORDERS


def test_the_total_counts_the_matches(store):
    bundle = search(store, "ServiceRequest?code=http://loinc.org|")
    assert bundle["total"] == 3 and len(bundle["entry"]) == 3


# -- string ------------------------------------------------------------------------------

STRING_CASES = [
    # default: starts-with, case- and accent-insensitive (search.html#string)
    ("Patient?family=müller", {"pat-muller", "pat-muller2"}),
    ("Patient?family=Muller", {"pat-muller", "pat-muller2"}),
    ("Patient?family=MÜLL", {"pat-muller", "pat-muller2"}),
    ("Patient?family=mull", {"pat-muller", "pat-muller2"}),
    ("Patient?family=ller", set()),
    ("Patient?given=zoe", {"pat-muller"}),
    ("Patient?given=Jo", {"pat-muller2", "pat-obermuller", "pat-smith"}),
    ("Practitioner?name=pena", {"rad-1"}),
    ("Practitioner?family=WEISS", {"dr-ordering"}),  # ß case-folds to ss
    # :exact: the whole string, case and accents as written
    ("Patient?family:exact=Müller", {"pat-muller"}),
    ("Patient?family:exact=Muller", {"pat-muller2"}),
    ("Patient?family:exact=müller", set()),
    ("Patient?family:exact=Müll", set()),
    # :contains: anywhere in the string, case- and accent-insensitive
    ("Patient?family:contains=LLER", {"pat-muller", "pat-muller2", "pat-obermuller"}),
    ("Patient?family:contains=ermü", {"pat-obermuller"}),
    ("Patient?name:contains=ann", {"pat-muller", "pat-muller2", "pat-obermuller"}),  # Anna, Johann, Joanna
    # LIKE wildcards in the value are literal characters
    ("Patient?family=M_ller", set()),
    ("Patient?family=%25ller", set()),
    ("Patient?family:contains=_", set()),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), STRING_CASES, ids=[q for q, _ in STRING_CASES])
def test_string_matching(store, query, expected):
    assert found(store, query) == expected


HUMAN_NAME_AND_ADDRESS = [
    # name: any part of HumanName (family, given, prefix, suffix, text)
    ("Patient?name=joh", {"pat-muller2", "pat-smith"}),
    ("Patient?name=anna", {"pat-muller"}),
    ("Patient?name=obermu", {"pat-obermuller"}),
    ("Patient?name=q", {"pat-smith"}),
    # name.use is a code, not a part of the name (every name here is "official")
    ("Patient?name=official", set()),
    ("Patient?name:contains=fficia", set()),
    # address: line, city, district, state, postalCode, country, text; not use or type
    ("Patient?address=zurich", {"pat-muller"}),
    ("Patient?address=bahnhofstrasse", {"pat-muller"}),
    # a comma in a value is escaped with a backslash (search.html#escaping)
    ("Patient?address=bahnhofstrasse 12\\, 2. og", {"pat-muller"}),
    ("Patient?address:contains=12\\, 2", {"pat-muller"}),
    ("Patient?address=basel\\,", set()),
    ("Patient?address=basel,zurich", {"pat-muller", "pat-muller2"}),
    ("Patient?address=8001", {"pat-muller"}),
    ("Patient?address=ch", {"pat-muller", "pat-muller2"}),
    ("Patient?address:contains=strasse", {"pat-muller"}),
    ("Patient?address:contains=vorstadt", {"pat-muller2"}),
    ("Patient?address=home", set()),
    ("Patient?address=work", set()),
    ("Patient?address-city=Basel", {"pat-muller2"}),
    ("Patient?address-city:exact=Zurich", set()),
    ("Patient?address-city:exact=Zürich", {"pat-muller"}),
    ("Patient?address-postalcode=800", {"pat-muller"}),
    ("Patient?address-use=home", {"pat-muller"}),  # the token parameter does see use
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), HUMAN_NAME_AND_ADDRESS, ids=[q for q, _ in HUMAN_NAME_AND_ADDRESS])
def test_human_name_and_address_parts(store, query, expected):
    assert found(store, query) == expected


def test_an_update_replaces_what_the_resource_is_found_by(client):
    put(client, patient("p-1", "Haugen", ["Ola"], identifier=[typed_identifier("MR", MRN, "MRN-1")]))
    assert found(client, "Patient?family=haugen&identifier=MRN-1") == {"p-1"}
    put(client, patient("p-1", "Berg", ["Ola"], identifier=[typed_identifier("MR", MRN, "MRN-2")]))
    assert found(client, "Patient?family=haugen") == set()
    assert found(client, "Patient?identifier=MRN-1") == set()
    assert found(client, "Patient?family=berg&identifier=MRN-2") == {"p-1"}
    assert client.delete("/fhir/Patient/p-1").status_code == 200
    assert found(client, "Patient?family=berg") == set()
    assert found(client, "Patient?family:missing=false") == set()


# -- uri ---------------------------------------------------------------------------------

PROTOCOL = "https://overread.org/fhir/protocols/second-opinion/ct-chest"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (f"ServiceRequest?instantiates-uri={PROTOCOL}", {"sr-1"}),
        ("ServiceRequest?instantiates-uri=https://overread.org/fhir/protocols/", set()),  # exact match
        (f"ServiceRequest?instantiates-uri={PROTOCOL.upper()}", set()),  # uris are case-sensitive
        ("ServiceRequest?instantiates-uri:below=https://overread.org/fhir/protocols/", {"sr-1"}),
        ("ServiceRequest?instantiates-uri:below=https://example.org/", set()),
        ("ServiceRequest?instantiates-uri:below=https://overread.org/FHIR/protocols/", set()),  # on SQLite too
    ],
)
def test_uri_matches_exactly_or_below(store, query, expected):
    assert found(store, query) == expected


# -- errors and unknown parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "Patient?family:sounds=muller",  # no such modifier
        "ServiceRequest?status:text=active",  # token :text is not supported
        "ServiceRequest?status:exact=active",  # a string modifier on a token
        "Patient?family:not=smith",  # a token modifier on a string
        "ServiceRequest?priority:missing=maybe",
        "ServiceRequest?status.code=active",  # only reference parameters chain
        "Patient?_count=ten",
        "Patient?_summary=some",
        "Patient?_total=exact",
        "Patient?_sort=shoe-size",
    ],
)
def test_bad_modifiers_and_values_are_400_operation_outcomes(store, query):
    assert_outcome(store.get(f"/fhir/{query}"), 400)


def test_unknown_parameters_are_ignored_by_default_and_left_out_of_the_self_link(store):
    for prefer in ({}, {"Prefer": "handling=lenient"}):
        bundle = search(store, "Patient?family=smith&shoe-size=44&_filter=name eq x", headers=prefer)
        assert [e["resource"]["id"] for e in bundle["entry"]] == ["pat-smith"]
        self_link = next(lk["url"] for lk in bundle["link"] if lk["relation"] == "self")
        assert "family=smith" in self_link and "shoe-size" not in self_link and "_filter" not in self_link


@pytest.mark.parametrize(
    "query",
    [
        "Patient?family=smith&shoe-size=44",
        "Patient?shoe-size:exact=44",
        "ServiceRequest?subject:Patient.shoe-size=44",  # a chain into an unknown parameter
        "Patient?_filter=name eq x",
        "Patient?_has:Task:patient:shoe-size=44",  # reverse chaining into an unknown parameter
    ],
)
def test_unknown_parameters_are_400_with_prefer_handling_strict(store, query):
    outcome = assert_outcome(store.get(f"/fhir/{query}", headers={"Prefer": "handling=strict"}), 400)
    assert outcome["issue"][0]["code"] in ("not-supported", "invalid")


def test_known_parameters_pass_with_prefer_handling_strict(store):
    bundle = search(store, "Patient?family=smith&_count=5&_sort=family", headers={"Prefer": "handling=strict"})
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["pat-smith"]


def test_post_search_with_a_form_body(store):
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = store.post("/fhir/ServiceRequest/_search", content="code=http://loinc.org|24627-2&status=active", headers=form)
    assert r.status_code == 200, r.text
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["sr-1"]
    # URL parameters and body parameters are ANDed
    r = store.post("/fhir/ServiceRequest/_search?status=revoked", content="code=24627-2", headers=form)
    assert r.status_code == 200 and [e["resource"]["id"] for e in r.json()["entry"]] == ["sr-4"]
    # the body is percent-encoded like a query string
    r = store.post("/fhir/Patient/_search", content="family%3Aexact=M%C3%BCller", headers=form)
    assert r.status_code == 200 and [e["resource"]["id"] for e in r.json()["entry"]] == ["pat-muller"]


def test_post_search_errors_are_operation_outcomes(store):
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert_outcome(store.post("/fhir/Patient/_search", content="birthdate=soon", headers=form), 400)
    strict = {**form, "Prefer": "handling=strict"}
    assert_outcome(store.post("/fhir/Patient/_search", content="shoe-size=44", headers=strict), 400)
