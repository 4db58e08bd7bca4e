"""The sentences a case's Task.statusReason.text says about image linking (docs/image-linking.md).

One place for them, so every outcome reads the same way: a sentence that names the source
(``PACS "main"`` or ``the image store``) and the DICOM matching keys as ``Keyword=value``, never a
Python representation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cases.patient_match import Identity

IMAGE_STORE = "the image store"


def source(name: str, is_peer: bool) -> str:
    """How a reason names where it looked: ``PACS "main"``, or ``the image store``."""
    return f'PACS "{name}"' if is_peer else IMAGE_STORE


def keys(matching: Mapping[str, str]) -> str:
    """Matching keys as ``AccessionNumber=ACC123`` (several joined by ", ")."""
    return ", ".join(f"{keyword}={value}" for keyword, value in matching.items())


def identity(who: Identity) -> str:
    """A patient identity as ``PatientID=…, PatientName=…`` (or the FHIR element names)."""
    return ", ".join(f"{name}={value}" for name, value in who.shown) or "nothing known"


def not_found(wheres: Iterable[str], matching: Mapping[str, str]) -> str:
    """``No study on PACS "main" or in the image store matches AccessionNumber=ACC123.``"""
    return _sentence(f"No study {' or '.join(map(_at, wheres))} matches {keys(matching)}")


def unreachable(where: str, detail: str) -> str:
    return _sentence(f"Could not reach {where}: {detail}")


def failed(where: str, detail: str) -> str:
    return _sentence(f"{_capital(where)} answered with an error: {detail}")


def mismatch(where: str, study_uid: str, study: Identity, order: Identity) -> str:
    return _sentence(
        f"Study {study_uid} {_at(where)} is not linked: its patient ({identity(study)}) does not match"
        f" the order's patient ({identity(order)}); if it is the right study, confirm it with $link-imaging"
    )


def retrieving(where: str) -> str:
    return _sentence(f"Found on {where}; retrieving")


def no_query() -> str:
    return "The order has no accession number, Study Instance UID or patient id."


def error(exc: Exception) -> str:
    """A failure the worker did not expect (e.g. an answer the mapping refuses)."""
    return _sentence(f"Linking failed: {type(exc).__name__}: {exc}")


def confirmed(study_uid: str, who: str) -> str:
    return _sentence(f"Study {study_uid} confirmed by {who}; linking")


def join(sentences: Iterable[str]) -> str:
    return " ".join(dict.fromkeys(s for s in sentences if s))


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else f"{text}."


def _at(where: str) -> str:
    return f"in {where}" if where == IMAGE_STORE else f"on {where}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
