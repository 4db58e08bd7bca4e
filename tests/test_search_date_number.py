"""Date, number and quantity search (R4 search.html#date, #number, #quantity, #prefix), _lastUpdated.

A date search value and an indexed date are both intervals (a year, a month, a day, a second,
a Period); the prefixes compare the intervals. Numbers carry the precision they are written
with. Read-only cases use the radiology store of ``tests/search_data.py``, whose orders are:

    sr-1  authored 2024-03-01T09:30:00Z            occurrence 2024-03-04 (a day)
    sr-2  authored 2024-03-15T23:30:00-05:00       occurrence 2024-03-16T08:00Z..09:00Z
    sr-3  authored 2024-04-02 (a day)              occurrence 2024-04-01.. (open Period)
    sr-4  authored 2023-12-31T23:59:59Z            no occurrence
"""

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from tests.search_data import (
    XR_CHEST,
    assert_outcome,
    found,
    patient,
    put,
    put_all,
    service_request,
)

AUTHORED = [
    # precision: the search value is the whole year, month, day or second it names
    ("2024", {"sr-1", "sr-2", "sr-3"}),
    ("2023", {"sr-4"}),
    ("2024-03", {"sr-1", "sr-2"}),
    ("2024-03-01", {"sr-1"}),
    ("2024-03-01T09:30:00Z", {"sr-1"}),
    ("2024-03-01T09:30Z", {"sr-1"}),  # a minute
    ("2024-03-01T09:31Z", set()),
    ("2024-03-01T09:30:01Z", set()),
    ("eq2024-03", {"sr-1", "sr-2"}),
    # time zones: 23:30 at -05:00 on the 15th is the 16th in UTC
    ("2024-03-16", {"sr-2"}),
    ("2024-03-15", set()),
    ("2024-03-16T04:30:00Z", {"sr-2"}),
    ("2024-03-15T23:30:00-05:00", {"sr-2"}),
    (quote("2024-03-01T10:30:00+01:00"), {"sr-1"}),
    # a day-precision value is not inside a one-second search interval
    ("2024-04-02T12:00:00Z", set()),
    ("ne2024-03", {"sr-3", "sr-4"}),
    ("ne2024-03-01T09:30:00Z", {"sr-2", "sr-3", "sr-4"}),
    ("lt2024-03-01", {"sr-4"}),
    ("le2024-03-01", {"sr-1", "sr-4"}),
    ("lt2024-03-01T09:30:00Z", {"sr-4"}),
    ("le2024-03-01T09:30:00Z", {"sr-1", "sr-4"}),
    ("gt2024-03-16", {"sr-3"}),
    ("ge2024-03-16", {"sr-2", "sr-3"}),
    ("gt2024-03-01T09:30:00Z", {"sr-2", "sr-3"}),
    ("ge2024-04-02T12:00:00Z", {"sr-3"}),  # the day 2024-04-02 reaches past noon
    ("gt2024-04-02T12:00:00Z", {"sr-3"}),
    ("lt2024-04-02T12:00:00Z", {"sr-1", "sr-2", "sr-3", "sr-4"}),
    ("sa2024-03-01", {"sr-2", "sr-3"}),
    ("eb2024-03-16", {"sr-1", "sr-4"}),
    ("sa2024-04-02T12:00:00Z", set()),
    ("eb2024-04-02T12:00:00Z", {"sr-1", "sr-2", "sr-4"}),
    ("gt2030", set()),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), AUTHORED, ids=[v for v, _ in AUTHORED])
def test_date_prefixes_and_precision(store, value, expected):
    assert found(store, f"ServiceRequest?authored={value}") == expected


def test_a_date_range_is_two_anded_parameters(store):
    assert found(store, "ServiceRequest?authored=ge2024-01-01&authored=lt2024-04-01") == {"sr-1", "sr-2"}
    assert found(store, "ServiceRequest?authored=gt2024-03&authored=lt2024-03") == set()
    # comma: either
    assert found(store, "ServiceRequest?authored=2023,2024-04") == {"sr-3", "sr-4"}


OCCURRENCE = [
    # a Period is an interval too; an open end reaches to the end of time
    ("2024-03-16", {"sr-2"}),
    ("2024-03", {"sr-1", "sr-2"}),
    ("2024", {"sr-1", "sr-2"}),  # sr-3 never ends, so it is not within 2024
    ("2024-03-16T08:30:00Z", set()),  # an hour-long period is not within one second
    ("ge2024-03-16T08:30:00Z", {"sr-2", "sr-3"}),
    ("le2024-03-16T08:30:00Z", {"sr-1", "sr-2"}),
    ("gt2030-01-01", {"sr-3"}),
    ("lt2024-04-01", {"sr-1", "sr-2"}),
    ("le2024-04-01", {"sr-1", "sr-2", "sr-3"}),
    ("sa2024-03-16", {"sr-3"}),
    ("eb2024-03-16", {"sr-1"}),
    ("eb2024-03-16T08:30:00Z", {"sr-1"}),
    ("ne2024-03-16", {"sr-1", "sr-3"}),  # sr-4 has no occurrence to compare
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), OCCURRENCE, ids=[v for v, _ in OCCURRENCE])
def test_period_and_choice_values(store, value, expected):
    assert found(store, f"ServiceRequest?occurrence={value}") == expected


OTHER_DATES = [
    # birthDate "1970-11" is the whole month
    ("Patient?birthdate=1970", {"pat-muller", "pat-muller2"}),
    ("Patient?birthdate=1970-11", {"pat-muller2"}),
    ("Patient?birthdate=1970-11-15", set()),
    ("Patient?birthdate=ge1970-11-15", {"pat-muller2", "pat-obermuller", "pat-smith"}),
    ("Patient?birthdate=lt1970-11-15", {"pat-muller", "pat-muller2"}),
    ("Patient?birthdate=sa1970-11-15", {"pat-obermuller", "pat-smith"}),
    ("Patient?birthdate=le1985-02-28", {"pat-muller", "pat-muller2", "pat-obermuller"}),
    ("Patient?birthdate=gt1985", {"pat-smith"}),
    # an instant with milliseconds and an offset
    ("DiagnosticReport?issued=2024-03-05T15:00:00Z", {"dr-2"}),
    ("DiagnosticReport?issued=2024-03-05T16:00:00.000%2B01:00", {"dr-2"}),
    ("DiagnosticReport?issued=2024-03-05T15:00:00.001Z", set()),
    ("DiagnosticReport?date=2024-03", {"dr-1", "dr-2"}),
    ("DiagnosticReport?date=2024-03-17", {"dr-1"}),
    ("ImagingStudy?started=ge2024-03-16", {"is-2", "is-3"}),
    ("Task?period=2024-03", {"task-2"}),
    ("Task?period=ge2025-01-01", {"task-1"}),
    ("Task?authored-on=2024-03-01T09:31:00Z", {"task-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), OTHER_DATES, ids=[q for q, _ in OTHER_DATES])
def test_other_date_parameters(store, query, expected):
    assert found(store, query) == expected


def test_a_plus_sign_left_unencoded_still_means_an_offset(store):
    """A client that forgets to encode "+" sends a space (application/x-www-form-urlencoded)."""
    assert found(store, "ServiceRequest?authored=2024-03-01T10:30:00+01:00") == {"sr-1"}


@pytest.mark.parametrize(
    "value",
    ["2024-13", "2024-02-30", "2024-03-01T25:00:00Z", "yesterday", "xx2024", "gt", "2024-3-1", "20240301",
     "2024-03-01T09:30:00+1"],
)  # fmt: skip
def test_bad_dates_are_400(store, value):
    outcome = assert_outcome(store.get(f"/fhir/ServiceRequest?authored={value}"), 400)
    assert outcome["issue"][0]["code"] == "invalid"


def test_approximately_is_a_tenth_of_the_distance_from_now_and_at_least_a_day(client):
    today = datetime.now(UTC).date()
    put_all(
        client,
        [
            patient("p-1", "Haugen", ["Ola"]),
            *(
                service_request(f"sr-{days}", "Patient/p-1", XR_CHEST, f"ACC-{days}",
                                authoredOn=(today - timedelta(days=days)).isoformat())
                for days in (0, 3, 30)
            ),
            service_request("sr-2000", "Patient/p-1", XR_CHEST, "ACC-2000", authoredOn="2000-01-01"),
            service_request("sr-2000b", "Patient/p-1", XR_CHEST, "ACC-2000b", authoredOn="2000-06-01"),
            service_request("sr-2003", "Patient/p-1", XR_CHEST, "ACC-2003", authoredOn="2003-01-01"),
        ],
    )  # fmt: skip
    assert found(client, f"ServiceRequest?authored=ap{today.isoformat()}") == {"sr-0"}
    # 2000-01-01 is about 26 years ago: within ~2.6 years of it (holds until about 2030)
    assert found(client, "ServiceRequest?authored=ap2000-01-01") == {"sr-2000", "sr-2000b"}


# -- _lastUpdated ----------------------------------------------------------------------------


def test_last_updated(client):
    first = put(client, patient("p-first", "Haugen", ["Ola"]))
    time.sleep(0.01)
    second = put(client, patient("p-second", "Berg", ["Kari"]))
    t1, t2 = first["meta"]["lastUpdated"], second["meta"]["lastUpdated"]
    assert t1 < t2
    year = t1[:4]
    assert found(client, f"Patient?_lastUpdated={year}") == {"p-first", "p-second"}
    assert found(client, f"Patient?_lastUpdated={quote(t1)}") == {"p-first"}
    assert found(client, f"Patient?_lastUpdated=gt{quote(t1)}") == {"p-second"}
    assert found(client, f"Patient?_lastUpdated=ge{quote(t1)}") == {"p-first", "p-second"}
    assert found(client, f"Patient?_lastUpdated=lt{quote(t2)}") == {"p-first"}
    assert found(client, f"Patient?_lastUpdated=le{quote(t2)}&_lastUpdated=gt{quote(t1)}") == {"p-second"}
    assert found(client, f"Patient?_lastUpdated=lt{year}") == set()
    assert found(client, f"Patient?_lastUpdated=gt{int(year) + 1}") == set()
    # an update moves it
    time.sleep(0.01)
    put(client, {**first, "active": True})
    assert found(client, f"Patient?_lastUpdated=gt{quote(t2)}") == {"p-first"}
    assert_outcome(client.get("/fhir/Patient?_lastUpdated=last-week"), 400)


# -- number and quantity ------------------------------------------------------------------

# Lesion sizes obs-1..4: 12.5, 100, 100.4 and 99.4 mm; obs-5: 0.5 cm; obs-6: -10 [hnsf'U] (a CT density)
QUANTITY = [
    # implicit precision: half a unit of the last digit given, so "100" is [99.5, 100.5),
    # "100.0" is [99.95, 100.05), "1.0e2" is [95, 105) and "1e2" is [50, 150)
    ("100", {"obs-2", "obs-3"}),
    ("100.0", {"obs-2"}),
    ("100.00", {"obs-2"}),
    ("1e2", {"obs-2", "obs-3", "obs-4"}),
    ("1.0e2", {"obs-2", "obs-3", "obs-4"}),
    ("1.000e2", {"obs-2"}),
    ("12.5", {"obs-1"}),
    ("12.50", {"obs-1"}),
    ("12.4", set()),
    ("0.5", {"obs-5"}),
    ("-10", {"obs-6"}),
    # prefixes compare with the exact value
    ("gt100", {"obs-3"}),
    ("ge100", {"obs-2", "obs-3"}),
    ("lt100", {"obs-1", "obs-4", "obs-5", "obs-6"}),
    ("le100", {"obs-1", "obs-2", "obs-4", "obs-5", "obs-6"}),
    ("ne100", {"obs-1", "obs-4", "obs-5", "obs-6"}),
    ("eq100", {"obs-2", "obs-3"}),
    ("sa100", {"obs-3"}),
    ("eb12.5", {"obs-5", "obs-6"}),
    ("gt-20", {"obs-1", "obs-2", "obs-3", "obs-4", "obs-5", "obs-6"}),
    ("lt-5", {"obs-6"}),
    # ap: within 10 % of the value, on either side of zero
    ("ap100", {"obs-2", "obs-3", "obs-4"}),
    ("ap-10", {"obs-6"}),
    ("ap11.5", {"obs-1"}),
    # with units: number|system|code, or number||code
    ("100||mm", {"obs-2", "obs-3"}),
    ("0.5|http://unitsofmeasure.org|cm", {"obs-5"}),
    ("0.5|http://unitsofmeasure.org|mm", set()),
    ("0.5|http://example.org/units|cm", set()),
    ("gt50||mm", {"obs-2", "obs-3", "obs-4"}),
    ("gt0||cm", {"obs-5"}),
    ("12.5,0.5", {"obs-1", "obs-5"}),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), QUANTITY, ids=[v for v, _ in QUANTITY])
def test_number_precision_and_prefixes_on_quantities(store, value, expected):
    assert found(store, f"Observation?value-quantity={quote(value, safe='|,')}") == expected


@pytest.mark.parametrize("value", ["abc", "gt", "1..2", "12mm", "ap", "--1", "nan", "inf"])
def test_bad_numbers_are_400(store, value):
    outcome = assert_outcome(store.get(f"/fhir/Observation?value-quantity={value}"), 400)
    assert outcome["issue"][0]["code"] == "invalid"


def test_component_values_of_several_components_are_each_indexed(client):
    """``(Observation.component.value as Quantity)``: fhirpathpy refused "as" on two components (a 500)."""
    axes = {"long axis": 14, "short axis": 9}
    components = [
        {"code": {"text": k}, "valueQuantity": {"value": v, "unit": "mm", "code": "mm"}} for k, v in axes.items()
    ]
    body = {"resourceType": "Observation", "id": "lesion", "status": "final", "code": {"text": "lesion"},
            "component": components}  # fmt: skip
    assert client.put("/fhir/Observation/lesion", json=body).status_code == 201
    assert found(client, "Observation?component-value-quantity=9||mm") == {"lesion"}
    assert found(client, "Observation?component-value-quantity=14") == {"lesion"}
    assert found(client, "Observation?component-value-quantity=10") == set()
