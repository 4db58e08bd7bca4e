"""Property-based: whatever JSON body or query string a client sends, the FHIR API answers it
without a 5xx, an error as an OperationOutcome (issue 15, "No 500 from bad input").

Bounded (``max_examples``, no deadline) so the module stays within seconds on each database; the
store is the module's radiology data (tests/search_data.py), so searches meet real rows.
"""

from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

BOUNDED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Element names of the resources searched and written here, and some that no resource has.
NAMES = ["resourceType", "id", "meta", "identifier", "name", "family", "given", "birthDate", "gender",
         "deceasedDateTime", "extension", "url", "valueString", "subject", "reference", "status", "code",
         "coding", "system", "value", "valueQuantity", "entry", "request", "method", "resource", "type",
         "parameter", "op", "path", "data", "contentType", "text", "", "\u0000"]  # fmt: skip
TYPES = ["Patient", "Observation", "Bundle", "Parameters", "Binary", "ServiceRequest", "Nope", ""]

text = st.one_of(st.text(max_size=40), st.sampled_from(["\u0000", "..", "²", "a" * 600, "http://x/fhir/Patient/1"]))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), text,
    st.sampled_from(TYPES), st.sampled_from(["9999-12-31T23:30:00-05:00", "0001-01-01T00:00:00+14:00", "2024-13-40"]),
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(NAMES), text), inner, max_size=5),
    ),
    max_leaves=25,
)
resources = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(TYPES)},
    optional={name: json_values for name in ["id", "name", "identifier", "birthDate", "extension", "subject",
                                             "entry", "type", "parameter", "data", "valueQuantity"]},
)  # fmt: skip


def deep(value: Any) -> Any:
    """``value`` 80 levels down: deeper than any resource, past the body's nesting limit."""
    for _ in range(80):
        value = {"extension": [value]}
    return value


bodies = st.one_of(resources, json_values, json_values.map(deep))

PARAMS = ["name", "family", "birthdate", "identifier", "subject", "subject:Patient", "patient.name", "_id",
          "_lastUpdated", "_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_elements",
          "_total", "value-quantity", "code", "status", "_has:Observation:subject:status", "name:exact",
          "name:contains", "identifier:of-type", "url:below", "date", "nope"]  # fmt: skip
PREFIXES = ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"]
values = st.one_of(
    text,
    st.builds(lambda p, v: p + v, st.sampled_from(PREFIXES),
              st.one_of(text, st.sampled_from(["9999", "0001", "1e-999999999", "²", str(2**63),
                                               "2024-01-01T00:00:00-05:00"]))),
)  # fmt: skip
queries = st.lists(st.tuples(st.one_of(st.sampled_from(PARAMS), text), values), max_size=5)


def assert_answered(response: Any) -> None:
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        assert response.json()["resourceType"] == "OperationOutcome", response.text[:500]


@BOUNDED
@given(
    body=bodies,
    method=st.sampled_from(
        [
            "POST /fhir/Patient",
            "PUT /fhir/Patient/p",
            "POST /fhir",
            "PATCH /fhir/Patient/missing",
            "POST /fhir/Patient/$validate",
        ]
    ),
)
@example(body={"resourceType": "Patient", "name": [{"family": "a\u0000b"}]}, method="POST /fhir/Patient")
@example(body={"resourceType": "Parameters", "parameter": {}}, method="POST /fhir/Patient/$validate")
@example(
    body={"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": 1}}]},
    method="POST /fhir",
)
@example(
    body={"resourceType": "Patient", "id": "p", "deceasedDateTime": "9999-12-31T23:30:00-05:00"},
    method="PUT /fhir/Patient/p",
)
def test_any_json_body_is_answered_without_a_5xx(store, body, method):
    verb, path = method.split(" ")
    assert_answered(store.request(verb, path, json=body))


@BOUNDED
@given(query=queries, rtype=st.sampled_from(["Patient", "Observation", "ImagingStudy", "", "Patient/_history"]))
@example(query=[("_count", "²")], rtype="Patient")
@example(query=[("_offset", str(2**63))], rtype="Patient/_history")
@example(query=[("birthdate", "ap9999")], rtype="Patient")
@example(query=[("value-quantity", "1e-999999999")], rtype="Observation")
@example(query=[("name", "a" * 60_000)], rtype="Patient")
def test_any_query_string_is_answered_without_a_5xx(store, query, rtype):
    qs = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query)
    assert_answered(store.get(f"/fhir/{rtype}?{qs}"))
