"""Paging, sorting and the shape of search results (R4 search.html#sort, #count, #summary, #elements,
#total; http.html#paging).

The store is the radiology store of ``tests/search_data.py`` plus 25 more cases (Tasks
``case-00`` … ``case-24``), loaded once per database.
"""

import math
import time
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.search_data import (
    assert_outcome,
    case_tasks,
    ids,
    link,
    module_client,
    patient,
    put,
    radiology,
    search,
    typed_ids,
)

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def store_resources():
    return [*radiology(), *case_tasks()]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory):
    yield from module_client(request, tmp_path_factory, store_resources)


def tasks_where(**criteria) -> set[str]:
    """The oracle: ids of the stored Tasks whose top-level elements have these values."""
    return {
        r["id"]
        for r in store_resources()
        if r["resourceType"] == "Task" and all(r.get(k) == v for k, v in criteria.items())
    }


def follow(client, bundle, relation="next"):
    """Every page from this one on, following one link relation until there is none."""
    pages = [bundle]
    while (url := link(pages[-1], relation)) is not None:
        assert len(pages) < 100, "paging does not end"
        r = client.get(url)
        assert r.status_code == 200, r.text
        pages.append(r.json())
    return pages


# -- paging ------------------------------------------------------------------------------

PAGED = [
    ("Task?_count=7", tasks_where()),
    ("Task?_count=1&owner=Practitioner/rad-2", {"task-2"} | {f"case-{n:02d}" for n in range(1, 25, 2)}),
    ("Task?status=requested&_count=4&_sort=-authored-on", tasks_where(status="requested")),
    ("Task?_count=5&_sort=authored-on", tasks_where()),  # pairs of equal authoredOn across pages
    ("Task?_count=3&_sort=status,-_id", tasks_where()),
    ("Task?_count=3&_total=none", tasks_where()),
    ("Task?_count=4&_total=none", tasks_where()),  # 28 = 7 full pages
    ("Task?_count=4&_total=none&_include=Task:focus", tasks_where()),
    ("Task?_count=6&_include=Task:focus&_revinclude=Task:part-of", tasks_where()),
    ("Task?_count=50", tasks_where()),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), PAGED, ids=[q for q, _ in PAGED])
def test_next_links_page_through_every_match_exactly_once(store, query, expected):
    count = int(dict(parse_qsl(query.partition("?")[2]))["_count"])
    pages = follow(store, search(store, query))
    seen = [rid for page in pages for rid in ids(page)]
    assert len(seen) == len(set(seen)), f"a match appears on two pages: {seen}"
    assert set(seen) == expected
    assert len(pages) == max(math.ceil(len(expected) / count), 1)
    for page in pages:
        assert 0 < len(ids(page)) <= count
        if "_total=none" in query:
            assert "total" not in page
        else:
            assert page["total"] == len(expected)
    # and back: previous links from the last page visit the same pages in reverse
    back = follow(store, pages[-1], "previous")
    assert [ids(p) for p in back] == [ids(p) for p in reversed(pages)]


def test_the_order_of_a_sorted_search_is_the_same_paged_or_not(store):
    whole = ids(search(store, "Task?_sort=-authored-on,status&_count=100"))
    paged = [
        rid for page in follow(store, search(store, "Task?_sort=-authored-on,status&_count=4")) for rid in ids(page)
    ]
    assert paged == whole and len(whole) == 28


def test_links_keep_the_search_and_drop_what_was_ignored(store):
    bundle = search(store, "Task?status=requested&_sort=-authored-on&_include=Task:focus&shoe-size=44&_count=2")
    params = dict(parse_qsl(urlsplit(link(bundle, "next")).query))
    assert params == {
        "status": "requested", "_sort": "-authored-on", "_include": "Task:focus", "_count": "2", "_offset": "2",
    }  # fmt: skip
    self_params = dict(parse_qsl(urlsplit(link(bundle, "self")).query))
    assert "shoe-size" not in self_params and self_params["status"] == "requested"
    assert link(bundle, "previous") is None
    first = dict(parse_qsl(urlsplit(link(bundle, "first")).query))
    assert "_offset" not in first and first["_count"] == "2"
    assert urlsplit(link(bundle, "next")).path == "/fhir/Task"


def test_the_pages_of_a_post_search_are_get_links(store):
    r = store.post(
        "/fhir/Task/_search",
        content="status=requested&_count=3&_sort=_id",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    pages = follow(store, r.json())
    assert {rid for page in pages for rid in ids(page)} == tasks_where(status="requested")


def test_count_zero_gives_the_total_only(store):
    bundle = search(store, "Task?status=completed&_count=0")
    assert bundle["total"] == len(tasks_where(status="completed")) and "entry" not in bundle
    assert link(bundle, "next") is None


def test_a_count_beyond_the_maximum_is_capped_not_refused(store):
    bundle = search(store, "Task?_count=100000")
    assert len(ids(bundle)) == 28 and link(bundle, "next") is None


@pytest.mark.parametrize("value", ["-1", "ten", "2.5", ""])
def test_a_bad_count_is_400(store, value):
    assert_outcome(store.get(f"/fhir/Task?_count={value}"), 400)


# -- _sort -------------------------------------------------------------------------------

SORTS = [
    ("ServiceRequest?_sort=authored", ["sr-4", "sr-1", "sr-2", "sr-3"]),
    ("ServiceRequest?_sort=-authored", ["sr-3", "sr-2", "sr-1", "sr-4"]),
    ("ServiceRequest?_sort=status,-authored", ["sr-3", "sr-1", "sr-2", "sr-4"]),
    ("ServiceRequest?_sort=-status,authored", ["sr-4", "sr-2", "sr-1", "sr-3"]),
    ("ServiceRequest?_sort=_id", ["sr-1", "sr-2", "sr-3", "sr-4"]),
    ("ServiceRequest?_sort=-_id", ["sr-4", "sr-3", "sr-2", "sr-1"]),
    # resources without a value come last, in both directions
    ("ServiceRequest?_sort=priority", ["sr-1", "sr-2", "sr-3", "sr-4"]),
    ("ServiceRequest?_sort=-priority", ["sr-3", "sr-2", "sr-1", "sr-4"]),
    # a Period sorts by its start ascending and by its end descending; an open end is the latest
    ("ServiceRequest?_sort=occurrence", ["sr-1", "sr-2", "sr-3", "sr-4"]),
    ("ServiceRequest?_sort=-occurrence", ["sr-3", "sr-2", "sr-1", "sr-4"]),
    ("ServiceRequest?_sort=status,_id&status=active,revoked", ["sr-1", "sr-3", "sr-4"]),
    # strings sort case- and accent-insensitively; a repeated element by its least (ascending)
    # or greatest (descending) value
    ("Patient?_sort=family,given", ["pat-muller", "pat-muller2", "pat-obermuller", "pat-smith"]),
    ("Patient?_sort=-family,-given", ["pat-smith", "pat-obermuller", "pat-muller", "pat-muller2"]),
    ("Patient?_sort=birthdate", ["pat-muller", "pat-muller2", "pat-obermuller", "pat-smith"]),
    ("Patient?_sort=-birthdate", ["pat-smith", "pat-obermuller", "pat-muller2", "pat-muller"]),
    ("Patient?_sort=gender,-birthdate", ["pat-obermuller", "pat-muller", "pat-smith", "pat-muller2"]),
    ("ImagingStudy?_sort=-started", ["is-3", "is-2", "is-1"]),
    ("DiagnosticReport?_sort=issued", ["dr-2", "dr-1"]),
    ("Observation?_sort=value-quantity", ["obs-6", "obs-5", "obs-1", "obs-4", "obs-2", "obs-3"]),
    ("Observation?_sort=-value-quantity,_id", ["obs-3", "obs-2", "obs-4", "obs-1", "obs-5", "obs-6"]),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), SORTS, ids=[q for q, _ in SORTS])
def test_sort(store, query, expected):
    assert ids(search(store, query)) == expected


def test_sort_by_last_updated(client):
    for pid in ("p-b", "p-c", "p-a"):
        put(client, patient(pid, "Haugen", ["Ola"]))
        time.sleep(0.005)
    assert ids(search(client, "Patient?_sort=_lastUpdated")) == ["p-b", "p-c", "p-a"]
    assert ids(search(client, "Patient?_sort=-_lastUpdated")) == ["p-a", "p-c", "p-b"]
    put(client, patient("p-b", "Haugen", ["Ola"], active=True))  # an update moves it to the end
    assert ids(search(client, "Patient?_sort=_lastUpdated")) == ["p-c", "p-a", "p-b"]


@pytest.mark.parametrize("value", ["shoe-size", "-", "status:not", "family"])
def test_sorting_by_an_unknown_parameter_is_400(store, value):
    assert_outcome(store.get(f"/fhir/ServiceRequest?_sort={value}"), 400)


# -- _summary, _elements, _total -------------------------------------------------------------


def only_match(bundle):
    matches = [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    assert len(matches) == 1, matches
    return matches[0]


def test_summary_true_keeps_the_summary_elements_and_marks_the_resource_subsetted(store):
    resource = only_match(search(store, "Patient?_id=pat-muller&_summary=true"))
    assert set(resource) == {
        "resourceType", "id", "meta", "identifier", "active", "name", "telecom", "gender", "birthDate", "address",
    }  # fmt: skip
    assert SUBSETTED in resource["meta"]["tag"]
    assert resource["meta"]["versionId"] == "1"


def test_summary_text_keeps_the_narrative(store):
    resource = only_match(search(store, "Patient?_id=pat-muller&_summary=text"))
    assert {"resourceType", "id", "meta", "text"} <= set(resource)
    assert not {"name", "communication", "address", "identifier"} & set(resource)
    assert resource["text"]["div"].endswith("Zoë Müller</div>")
    assert SUBSETTED in resource["meta"]["tag"]


def test_summary_data_drops_only_the_narrative(store):
    full = store.get("/fhir/Patient/pat-muller").json()
    resource = only_match(search(store, "Patient?_id=pat-muller&_summary=data"))
    assert set(resource) == set(full) - {"text"}
    assert resource["communication"] == full["communication"]
    assert SUBSETTED in resource["meta"]["tag"]


def test_summary_false_is_the_whole_resource(store):
    full = store.get("/fhir/Patient/pat-muller").json()
    assert only_match(search(store, "Patient?_id=pat-muller&_summary=false")) == full
    assert SUBSETTED not in full["meta"].get("tag", [])


def test_summary_count_is_the_total_without_entries(store):
    bundle = search(store, "Patient?gender=female&_summary=count")
    assert bundle["total"] == 2 and "entry" not in bundle
    bundle = search(store, "Task?_summary=count&_count=5")
    assert bundle["total"] == 28 and "entry" not in bundle
    assert link(bundle, "next") is None
    assert search(store, "Task?_summary=count&_total=none")["total"] == 28  # a count is its total


def test_elements_keeps_the_named_elements_and_marks_the_resource_subsetted(store):
    resource = only_match(search(store, "ServiceRequest?_id=sr-2&_elements=identifier,status"))
    assert set(resource) == {"resourceType", "id", "meta", "identifier", "status"}
    assert resource["identifier"][0]["value"] == "ACC-24-0002"
    assert SUBSETTED in resource["meta"]["tag"]
    patient_ = only_match(search(store, "Patient?_id=pat-smith&_elements=name,birthDate"))
    assert set(patient_) == {"resourceType", "id", "meta", "name", "birthDate"}


def test_elements_apply_to_every_page(store):
    pages = follow(store, search(store, "Task?_elements=status&_count=10"))
    assert len(pages) == 3
    for page in pages:
        for entry in page["entry"]:
            assert set(entry["resource"]) == {"resourceType", "id", "meta", "status"}


def test_the_stored_resource_is_not_changed_by_a_subsetted_search(store):
    search(store, "Patient?_id=pat-muller&_elements=name")
    resource = store.get("/fhir/Patient/pat-muller").json()
    assert "communication" in resource and SUBSETTED not in resource["meta"].get("tag", [])


@pytest.mark.parametrize(("total", "present"), [("none", False), ("accurate", True), ("estimate", True)])
def test_total(store, total, present):
    bundle = search(store, f"ServiceRequest?status=active&_total={total}")
    assert ("total" in bundle) is present
    if present:
        assert bundle["total"] == 2
    assert ids(bundle) and len(ids(bundle)) == 2


def test_summary_does_not_stop_includes(store):
    bundle = search(store, "Task?_id=task-1&_include=Task:focus&_summary=true")
    assert typed_ids(bundle, "include") == {"ServiceRequest/sr-1"}
