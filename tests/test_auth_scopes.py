"""SMART scopes as a table (SMART App Launch 2.x, "Scopes"): the grammar, what a scope set allows,
what a client asking for some gets within those allowed; the permission each interaction needs; and
the OVERREAD_AUTH switch."""

import subprocess
from pathlib import Path

import pytest

from fhir_server.access import Access, authorize
from fhir_server.errors import FhirError
from fhir_server.http import FhirRequest
from fhir_server.scopes import Scope, ScopeError, allows, granted, parse, parse_all
from overread.settings import Settings
from tests.processes import OVERREAD, serve_env


@pytest.mark.parametrize(
    ("text", "rtype", "permissions", "query"),
    [
        ("system/Task.rs", "Task", "rs", ()),
        ("system/*.cruds", "*", "cruds", ()),
        ("system/Patient.c", "Patient", "c", ()),
        ("system/*.read", "*", "rs", ()),
        ("system/Patient.write", "Patient", "cud", ()),
        ("system/*.*", "*", "cruds", ()),
        ("system/Observation.rs?category=laboratory", "Observation", "rs", (("category", "laboratory"),)),
        ("system/Observation.rs?status=final&category=laboratory", "Observation", "rs",
         (("category", "laboratory"), ("status", "final"))),
        ("system/hl7.r", "hl7", "r", ()),
    ],
)  # fmt: skip
def test_grammar(text: str, rtype: str, permissions: str, query: tuple[tuple[str, str], ...]) -> None:
    scope = parse(text)
    assert scope == Scope(rtype, frozenset(permissions), query, text)
    assert str(scope) == text


@pytest.mark.parametrize(
    "text",
    ["system/Task", "system/Task.", "system/Task.sr", "system/Task.rrs", "system/Task.x", "system/.rs",
     "system/Ta-sk.rs", "system/Task.rs?category", "system/Task.reads"],
)  # fmt: skip
def test_malformed_scopes(text: str) -> None:
    with pytest.raises(ScopeError):
        parse(text)


def test_scopes_of_other_kinds_are_not_ours() -> None:
    assert parse_all("openid fhirUser launch patient/*.rs user/Patient.read system/Task.r") == [parse("system/Task.r")]


GRANTS = parse_all("system/Task.rs system/Patient.read system/Observation.rs?category=laboratory system/hl7.r")


@pytest.mark.parametrize(
    ("interaction", "rtype", "params", "allowed"),
    [
        ("r", "Task", [], True),
        ("s", "Task", [("status", "ready")], True),
        ("c", "Task", [], False),
        ("u", "Task", [], False),
        ("r", "Patient", [], True),  # v1 read = rs
        ("s", "Patient", [], True),
        ("d", "Patient", [], False),
        ("r", "ServiceRequest", [], False),
        ("s", "Observation", [], False),  # the filter is not asked
        ("s", "Observation", [("category", "laboratory")], True),
        ("s", "Observation", [("category", "laboratory"), ("code", "x")], True),
        ("s", "Observation", [("category", "imaging")], False),
        ("r", "hl7", [], True),
        ("u", "hl7", [], False),
    ],
)
def test_allows(interaction: str, rtype: str, params: list[tuple[str, str]], allowed: bool) -> None:
    assert allows(GRANTS, interaction, rtype, params) is allowed


def test_a_wildcard_covers_every_resource_type_but_no_area() -> None:
    everything = parse_all("system/*.cruds")
    assert allows(everything, "d", "Patient")
    assert not allows(everything, "r", "hl7")


@pytest.mark.parametrize(
    ("asked", "allowed", "gets"),
    [
        ("system/Task.rs", "system/*.cruds", "system/Task.rs"),  # as asked, text and all
        ("system/Patient.read", "system/*.*", "system/Patient.read"),
        ("system/*.cruds", "system/Task.rs system/Patient.c", "system/Task.rs system/Patient.c"),
        ("system/Task.cruds", "system/Task.rs", "system/Task.rs"),
        ("system/Observation.rs", "system/Observation.rs?category=laboratory",
         "system/Observation.rs?category=laboratory"),
        ("system/Observation.rs?category=laboratory", "system/Observation.rs",
         "system/Observation.rs?category=laboratory"),
        ("system/Task.rs system/Patient.rs", "system/Task.r", "system/Task.r"),
        ("system/hl7.r", "system/*.cruds", ""),
        ("system/Task.c", "system/Task.rs", ""),
    ],
)  # fmt: skip
def test_granted(asked: str, allowed: str, gets: str) -> None:
    assert " ".join(map(str, granted(parse_all(asked), parse_all(allowed)))) == gets


@pytest.mark.parametrize(
    ("method", "path", "scope", "allowed"),
    [
        ("GET", "Patient/1", "system/Patient.r", True),
        ("GET", "Patient/1/_history/2", "system/Patient.r", True),
        ("GET", "Patient/1/_history", "system/Patient.r", True),
        ("GET", "Patient/_history", "system/Patient.r", False),  # a type's history lists like a search
        ("GET", "Patient/_history", "system/Patient.s", True),
        ("GET", "_history", "system/Patient.s", False),
        ("GET", "Patient", "system/Patient.r", False),
        ("POST", "Patient/_search", "system/Patient.s", True),
        ("POST", "Patient", "system/Patient.c", True),
        ("PUT", "Patient/1", "system/Patient.u", True),
        ("PATCH", "Patient/1", "system/Patient.u", True),
        ("DELETE", "Patient/1", "system/Patient.d", True),
        ("DELETE", "Patient", "system/Patient.d", False),  # a conditional delete searches too
        ("DELETE", "Patient", "system/Patient.ds", True),
        ("PUT", "Patient", "system/Patient.us", True),
        ("POST", "Patient/$validate", "system/Patient.r", True),
        ("POST", "Patient/1/$validate", "system/Patient.c", False),
        ("POST", "ServiceRequest/1/$link-imaging", "system/ServiceRequest.rs", False),
        ("POST", "ServiceRequest/1/$link-imaging", "system/ServiceRequest.u", True),
        ("GET", "", "system/Patient.s", False),  # a system search: every type
        ("GET", "metadata", "system/Patient.s", True),
        ("POST", "", "system/Patient.s", True),  # a Bundle: its entries are checked
    ],
)
def test_each_interaction_needs_its_permission(method: str, path: str, scope: str, allowed: bool) -> None:
    request = FhirRequest(method, path, access=Access("c", tuple(parse_all(scope))))
    if allowed:
        authorize(request)
    else:
        with pytest.raises(FhirError) as refused:
            authorize(request)
        assert refused.value.status == 403


def test_a_system_search_needs_every_type_it_searches() -> None:
    access = Access("c", tuple(parse_all("system/Patient.s system/Task.s")))
    authorize(FhirRequest("GET", "", [("_type", "Patient,Task")], access=access))
    with pytest.raises(FhirError):
        authorize(FhirRequest("GET", "", [("_type", "Patient,Observation")], access=access))


@pytest.mark.parametrize(("scope", "allowed"), [("system/Patient.c", False), ("system/Patient.crs", True)])
def test_a_conditional_create_searches_and_reads(scope: str, allowed: bool) -> None:
    """It answers the resource it found: a client that may only create must not read through it."""
    access = Access("c", tuple(parse_all(scope)))
    request = FhirRequest("POST", "Patient", headers={"if-none-exist": "identifier=x"}, access=access)
    if allowed:
        authorize(request)
    else:
        with pytest.raises(FhirError):
            authorize(request)
    authorize(FhirRequest("POST", "Patient", access=access))


@pytest.mark.parametrize(
    ("settings", "mode"),
    [
        ({}, "off"),  # every listener on loopback
        ({"http_host": "localhost", "mllp_host": "::1"}, "off"),
        ({"auth": "smart"}, "smart"),
        ({"http_host": "0.0.0.0"}, "smart"),  # beyond loopback: smart unless told otherwise
        ({"dicom_host": "10.1.2.3"}, "smart"),
    ],
)
def test_the_switch_defaults(settings: dict[str, str], mode: str) -> None:
    assert Settings(**settings).auth_mode() == mode  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "name"), [("http_host", "HTTP"), ("mllp_host", "MLLP"), ("dicom_host", "DICOM")])
def test_off_beyond_loopback_is_refused_naming_the_listener(field: str, name: str) -> None:
    with pytest.raises(ValueError, match=f"the {name} listener on '0.0.0.0'"):
        Settings(auth="off", **{field: "0.0.0.0"}).auth_mode()  # type: ignore[arg-type]


@pytest.mark.slow
def test_serve_refuses_to_start_with_auth_off_beyond_loopback(tmp_path: Path) -> None:
    env = serve_env(f"sqlite:///{tmp_path}/x.db", tmp_path, auth="off", mllp_host="0.0.0.0")
    done = subprocess.run([*OVERREAD, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "MLLP listener on '0.0.0.0'" in done.stderr
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened
