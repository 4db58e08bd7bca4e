"""Reference search, chaining and _include/_revinclude (R4 search.html#reference, #chaining, #include).

Read-only queries run against the radiology store of ``tests/search_data.py``; the tests
that delete or add resources use the per-test ``client`` fixture instead.
"""

import pytest

from fhir_server import search_limits
from fhir_server.search_limits import SearchLimits, limits
from tests.search_data import (
    EXTERNAL_PATIENT,
    XR_CHEST,
    assert_outcome,
    found,
    ids,
    patient,
    put_all,
    search,
    service_request,
    task,
    typed_ids,
)

# -- reference ---------------------------------------------------------------------------

REFERENCE_CASES = [
    ("ServiceRequest?subject=Patient/pat-muller", {"sr-1", "sr-2"}),
    ("ServiceRequest?subject=pat-muller", {"sr-1", "sr-2"}),  # a bare id
    ("ServiceRequest?subject:Patient=pat-muller", {"sr-1", "sr-2"}),  # typed by the modifier
    ("ServiceRequest?subject:Patient=pat-muller2", {"sr-3"}),
    ("ServiceRequest?subject:Practitioner=pat-muller", set()),
    ("ServiceRequest?subject=Practitioner/pat-muller", set()),
    ("ServiceRequest?patient=pat-muller", {"sr-1", "sr-2"}),
    ("ServiceRequest?patient=Patient/pat-muller,Patient/pat-muller2", {"sr-1", "sr-2", "sr-3"}),
    # absolute URLs: this server's base is a local reference, another server's only that URL
    ("ServiceRequest?subject=http://testserver/fhir/Patient/pat-muller", {"sr-1", "sr-2"}),
    (f"ServiceRequest?subject={EXTERNAL_PATIENT}", {"sr-4"}),
    (f"ServiceRequest?patient={EXTERNAL_PATIENT}", {"sr-4"}),
    ("ServiceRequest?requester=Practitioner/dr-ordering", {"sr-1", "sr-2"}),
    ("ServiceRequest?requester=dr-unknown", {"sr-3"}),  # the target need not exist
    ("ServiceRequest?performer=rad-1", {"sr-1"}),
    ("ServiceRequest?subject=Patient/pat-muller2/_history/1", {"sr-3"}),  # a versioned reference
    ("Task?focus=ServiceRequest/sr-3", {"task-3"}),
    ("Task?owner=Practitioner/rad-1", {"task-1", "task-3"}),
    ("Task?owner=rad-2,rad-1", {"task-1", "task-2", "task-3"}),
    ("Task?patient=pat-muller2", {"task-3"}),
    ("Task?part-of=Task/task-1", {"task-3"}),
    ("ImagingStudy?basedon=ServiceRequest/sr-2", {"is-2"}),
    ("ImagingStudy?endpoint=Endpoint/pacs-main", {"is-1", "is-3"}),
    ("DiagnosticReport?based-on=ServiceRequest/sr-2", {"dr-1"}),
    ("DiagnosticReport?results-interpreter=Practitioner/rad-1", {"dr-2"}),
    ("DiagnosticReport?result=Observation/obs-1", {"dr-1"}),
    ("Observation?patient=Patient/pat-muller2", {"obs-5", "obs-6"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), REFERENCE_CASES, ids=[q for q, _ in REFERENCE_CASES])
def test_reference_forms(store, query, expected):
    assert found(store, query) == expected


def test_an_absolute_url_of_another_server_is_not_a_local_reference(store):
    assert found(store, "ServiceRequest?subject=https://other-hospital.example.org/fhir/Patient/pat-muller") == set()


def test_a_reference_modifier_that_is_no_type_is_400(store):
    assert_outcome(store.get("/fhir/ServiceRequest?subject:exact=pat-muller"), 400)
    assert_outcome(store.get("/fhir/ServiceRequest?subject:Nonsense=pat-muller"), 400)


# -- chaining ----------------------------------------------------------------------------

CHAIN_CASES = [
    # "where is case X": the orders of the patient with this MRN
    ("ServiceRequest?patient.identifier=http://hospital.example.org/mrn|MRN-1001", {"sr-1", "sr-2"}),
    ("ServiceRequest?patient.identifier=MRN-1001", {"sr-1", "sr-2"}),  # pat-smith has no orders
    ("ServiceRequest?subject:Patient.name=muller", {"sr-1", "sr-2", "sr-3"}),
    ("ServiceRequest?subject:Patient.family:exact=Muller", {"sr-3"}),
    ("ServiceRequest?subject.name=johann", {"sr-3"}),  # every target type that knows the parameter
    ("ServiceRequest?patient.gender=male&status=active", {"sr-3"}),
    ("ServiceRequest?patient.birthdate=1970", {"sr-1", "sr-2", "sr-3"}),
    ("ServiceRequest?patient._id=pat-muller2", {"sr-3"}),
    ("ServiceRequest?patient.active:missing=true", set()),
    ("ServiceRequest?requester.family=weiss", {"sr-1", "sr-2"}),
    # the case (Task) of an accession number, and of an order code
    ("Task?focus:ServiceRequest.identifier=ACC-24-0002", {"task-2"}),
    ("Task?focus.code=http://loinc.org|24627-2", {"task-1"}),
    ("Task?focus:ServiceRequest.identifier=ACC-24-0001,ACC-24-0003", {"task-1", "task-3"}),
    ("DiagnosticReport?based-on:ServiceRequest.identifier=http://hospital.example.org/accession|ACC-24-0002",
     {"dr-1"}),
    ("ImagingStudy?basedon.status=active", {"is-1", "is-3"}),
    # a chain that ends in a reference parameter
    ("Task?focus:ServiceRequest.patient=pat-muller2", {"task-3"}),
    ("Task?focus.requester=Practitioner/dr-ordering", {"task-1", "task-2"}),
    ("DiagnosticReport?based-on.patient=Patient/pat-muller", {"dr-1", "dr-2"}),
    ("DiagnosticReport?based-on.requester:missing=true", set()),
    ("ImagingStudy?patient.name=zoe&modality=CT", {"is-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), CHAIN_CASES, ids=[q for q, _ in CHAIN_CASES])
def test_one_level_of_chaining(store, query, expected):
    assert found(store, query) == expected


# -- reverse chaining (_has, R4 search.html#has) ------------------------------------------

HAS_CASES = [
    # the patients with an active order; with an order of this accession number
    ("Patient?_has:ServiceRequest:subject:status=active", {"pat-muller", "pat-muller2"}),
    ("Patient?_has:ServiceRequest:patient:identifier=ACC-24-0003", {"pat-muller2"}),
    ("Patient?_has:ServiceRequest:patient:status=revoked", set()),  # sr-4's patient is on another server
    # the orders whose case is completed; a case's order whose report is final
    ("ServiceRequest?_has:Task:focus:status=completed", {"sr-2"}),
    ("ServiceRequest?_has:DiagnosticReport:based-on:status=final&status=completed", {"sr-2"}),
    # nested: the patients with an order whose case is owned by rad-2 (task-2), or by rad-1 (task-1, task-3)
    ("Patient?_has:ServiceRequest:subject:_has:Task:focus:owner=Practitioner/rad-2", {"pat-muller"}),
    ("Patient?_has:ServiceRequest:subject:_has:Task:focus:owner=Practitioner/rad-1", {"pat-muller", "pat-muller2"}),
    # with other criteria, ANDed
    ("Patient?_has:ServiceRequest:subject:status=active&gender=male", {"pat-muller2"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), HAS_CASES, ids=[q for q, _ in HAS_CASES])
def test_reverse_chaining(store, query, expected):
    assert found(store, query) == expected


def test_bad_reverse_chains_are_400(store):
    assert_outcome(store.get("/fhir/Patient?_has:ServiceRequest:status:status=active"), 400)  # not a reference
    assert_outcome(store.get("/fhir/Patient?_has:Nothing:subject:status=active"), 400)
    assert_outcome(store.get("/fhir/Patient?_has:ServiceRequest:subject"), 400)
    assert_outcome(store.get("/fhir/Practitioner?_has:ServiceRequest:subject:status=active"), 400)  # never one
    assert_outcome(store.get("/fhir/Patient?_has:ServiceRequest:subject:authored=2024-13"), 400)


def test_chained_values_are_checked_like_plain_ones(store):
    assert_outcome(store.get("/fhir/ServiceRequest?patient.birthdate=1970-13"), 400)
    assert_outcome(store.get("/fhir/ServiceRequest?patient.family:sounds=muller"), 400)
    assert_outcome(store.get("/fhir/ServiceRequest?status.code=x"), 400)  # not a reference


def test_a_chain_into_an_unknown_parameter_is_ignored_when_lenient(store):
    assert found(store, "ServiceRequest?patient.shoe-size=44") == {"sr-1", "sr-2", "sr-3", "sr-4"}


def test_a_chain_does_not_follow_deleted_targets(client):
    put_all(
        client,
        [
            patient("p-gone", "Lindqvist", ["Eva"]),
            service_request("sr-orphan", "Patient/p-gone", XR_CHEST, "ACC-9"),
        ],
    )
    assert found(client, "ServiceRequest?patient.family=lindqvist") == {"sr-orphan"}
    assert client.delete("/fhir/Patient/p-gone").status_code == 200
    assert found(client, "ServiceRequest?patient.family=lindqvist") == set()
    assert found(client, "ServiceRequest?patient=p-gone") == {"sr-orphan"}  # the reference is still there


# -- _include / _revinclude -----------------------------------------------------------------


INCLUDE_CASES = [
    ("ServiceRequest?_id=sr-1&_include=ServiceRequest:patient", {"sr-1"}, {"Patient/pat-muller"}),
    ("ServiceRequest?_id=sr-1&_include=ServiceRequest:subject:Patient", {"sr-1"}, {"Patient/pat-muller"}),
    ("ServiceRequest?_id=sr-1&_include=ServiceRequest:subject:Practitioner", {"sr-1"}, set()),
    # several includes; the order's requester appears once although two orders name her
    ("ServiceRequest?patient=pat-muller&_include=ServiceRequest:requester&_include=ServiceRequest:performer",
     {"sr-1", "sr-2"}, {"Practitioner/dr-ordering", "Practitioner/rad-1"}),
    # a reference to a resource the store does not have is simply not included
    ("ServiceRequest?_id=sr-3&_include=ServiceRequest:requester", {"sr-3"}, set()),
    ("ServiceRequest?_id=sr-4&_include=ServiceRequest:subject", {"sr-4"}, set()),
    # Type:* is every reference parameter of the type
    ("ServiceRequest?_id=sr-1&_include=ServiceRequest:*", {"sr-1"},
     {"Patient/pat-muller", "Practitioner/dr-ordering", "Practitioner/rad-1"}),
    # an include rule of another type does not apply to the matches
    ("ServiceRequest?_id=sr-1&_include=Task:owner", {"sr-1"}, set()),
    # _revinclude: the cases (Tasks), studies and reports of orders
    ("ServiceRequest?_id=sr-1,sr-2&_revinclude=Task:focus", {"sr-1", "sr-2"}, {"Task/task-1", "Task/task-2"}),
    ("ServiceRequest?_id=sr-2&_revinclude=ImagingStudy:basedon&_revinclude=DiagnosticReport:based-on",
     {"sr-2"}, {"ImagingStudy/is-2", "DiagnosticReport/dr-1"}),
    ("ServiceRequest?_id=sr-4&_revinclude=Task:focus", {"sr-4"}, set()),
    ("Patient?_id=pat-muller2&_revinclude=ServiceRequest:subject", {"pat-muller2"}, {"ServiceRequest/sr-3"}),
    ("Endpoint?_revinclude=ImagingStudy:endpoint", {"pacs-main"}, {"ImagingStudy/is-1", "ImagingStudy/is-3"}),
    # a resource that is a match is not repeated as an include (task-3 is part of task-1)
    ("Task?_id=task-1,task-3&_include=Task:part-of", {"task-1", "task-3"}, set()),
    ("Task?_id=task-3&_include=Task:part-of", {"task-3"}, {"Task/task-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "matches", "included"), INCLUDE_CASES, ids=[q for q, _, _ in INCLUDE_CASES])
def test_include_and_revinclude(store, query, matches, included):
    bundle = search(store, query)
    assert set(ids(bundle)) == matches
    assert typed_ids(bundle, "include") == included
    assert bundle["total"] == len(matches)  # included resources are not counted
    all_entries = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle.get("entry", [])]
    assert len(all_entries) == len(set(all_entries)), "an entry appears twice"


def test_included_entries_come_after_the_matches_with_full_urls(store):
    bundle = search(store, "Task?_id=task-2&_include=Task:focus&_include=Task:owner")
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes == ["match", "include", "include"]
    urls = {e["fullUrl"] for e in bundle["entry"]}
    assert urls == {
        "http://testserver/fhir/Task/task-2",
        "http://testserver/fhir/ServiceRequest/sr-2",
        "http://testserver/fhir/Practitioner/rad-2",
    }


ITERATE_CASES = [
    # without :iterate, a rule only applies to the matches
    ("Task?_id=task-2&_include=Task:focus&_include=ServiceRequest:patient", {"ServiceRequest/sr-2"}),
    ("Task?_id=task-2&_include=Task:focus&_include:iterate=ServiceRequest:patient",
     {"ServiceRequest/sr-2", "Patient/pat-muller"}),
    # the whole case from its Task: order, then the order's study and report
    ("Task?_id=task-2&_include=Task:focus&_revinclude:iterate=ImagingStudy:basedon"
     "&_revinclude:iterate=DiagnosticReport:based-on",
     {"ServiceRequest/sr-2", "ImagingStudy/is-2", "DiagnosticReport/dr-1"}),
    # two hops: report -> order -> requester
    ("DiagnosticReport?_id=dr-1&_include=DiagnosticReport:based-on&_include:iterate=ServiceRequest:requester",
     {"ServiceRequest/sr-2", "Practitioner/dr-ordering"}),
    ("Patient?_id=pat-muller2&_revinclude=ServiceRequest:subject&_revinclude:iterate=Task:focus",
     {"ServiceRequest/sr-3", "Task/task-3"}),
    # iterating a rule of the match type over its own output (Task part-of Task)
    ("Task?_id=task-3&_include:iterate=Task:part-of&_include:iterate=Task:focus",
     {"Task/task-1", "ServiceRequest/sr-3", "ServiceRequest/sr-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "included"), ITERATE_CASES, ids=[q for q, _ in ITERATE_CASES])
def test_iterate_follows_included_resources(store, query, included):
    assert typed_ids(search(store, query), "include") == included


def test_revinclude_wildcard_brings_everything_that_points_at_the_matches(store):
    bundle = search(store, "Patient?_id=pat-muller2&_revinclude=*")
    assert ids(bundle) == ["pat-muller2"]
    assert typed_ids(bundle, "include") == {
        "ServiceRequest/sr-3", "Task/task-3", "ImagingStudy/is-3", "Observation/obs-5", "Observation/obs-6",
    }  # fmt: skip


def test_includes_belong_to_the_page_they_are_on(store):
    first = search(store, "ServiceRequest?_sort=_id&_count=2&_include=ServiceRequest:patient")
    assert ids(first) == ["sr-1", "sr-2"] and typed_ids(first, "include") == {"Patient/pat-muller"}
    next_url = next(lk["url"] for lk in first["link"] if lk["relation"] == "next")
    second = store.get(next_url).json()
    assert ids(second) == ["sr-3", "sr-4"] and typed_ids(second, "include") == {"Patient/pat-muller2"}


def test_summary_count_has_no_includes(store):
    bundle = search(store, "ServiceRequest?_summary=count&_include=ServiceRequest:patient")
    assert bundle["total"] == 4 and "entry" not in bundle


@pytest.mark.parametrize(
    "query",
    [
        "ServiceRequest?_include=ServiceRequest:status",  # not a reference parameter
        "ServiceRequest?_include=ServiceRequest:nonsense",
        "ServiceRequest?_include=ServiceRequest",
        "ServiceRequest?_include=Nonsense:patient",
        "ServiceRequest?_revinclude=Task",
    ],
)
def test_bad_include_values_are_400(store, query):
    assert_outcome(store.get(f"/fhir/{query}"), 400)


def test_deleted_resources_are_neither_matched_nor_included(client):
    put_all(
        client,
        [
            patient("p-1", "Haugen", ["Ola"]),
            service_request("sr-a", "Patient/p-1", XR_CHEST, "ACC-1"),
            task("t-a", "ServiceRequest/sr-a", "Patient/p-1"),
            task("t-b", "ServiceRequest/sr-a", "Patient/p-1"),
        ],
    )
    assert client.delete("/fhir/Task/t-b").status_code == 200
    bundle = search(client, "ServiceRequest?_include=ServiceRequest:patient&_revinclude=Task:focus")
    assert ids(bundle) == ["sr-a"] and typed_ids(bundle, "include") == {"Patient/p-1", "Task/t-a"}
    assert client.delete("/fhir/Patient/p-1").status_code == 200
    bundle = search(client, "ServiceRequest?_include=ServiceRequest:patient&_revinclude=Task:focus")
    assert typed_ids(bundle, "include") == {"Task/t-a"}
    assert found(client, "Task") == {"t-a"}


def test_iterate_stops_at_the_depth_limit(client):
    # a chain of cases, each part of the one before: t0 <- t1 <- ... <- t6
    put_all(client, [task(f"t{n}", "ServiceRequest/sr-x", "Patient/p-x", partOf=[{"reference": f"Task/t{n - 1}"}]
                          if n else []) for n in range(7)])  # fmt: skip
    bundle = search(client, "Task?_id=t6&_include:iterate=Task:part-of")
    depth = limits().max_iterate_depth
    assert typed_ids(bundle, "include") == {f"Task/t{6 - k}" for k in range(1, depth + 2)}
    assert ids(bundle) == ["t6"]


def test_the_number_of_included_resources_is_capped(client, monkeypatch):
    put_all(client, [service_request("sr-x", "Patient/p-x", XR_CHEST, "ACC-X")])
    put_all(client, [task(f"t{n}", "ServiceRequest/sr-x", "Patient/p-x") for n in range(5)])
    assert len(typed_ids(search(client, "ServiceRequest?_revinclude=Task:focus"), "include")) == 5
    monkeypatch.setattr(search_limits, "_current", SearchLimits(max_included=3))
    bundle = search(client, "ServiceRequest?_revinclude=Task:focus")
    assert ids(bundle) == ["sr-x"] and len(typed_ids(bundle, "include")) == 3
