"""Conformance artifacts as FHIR JSON: loaded by the server, served, and used to validate."""

import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


@cache
def load(name: str) -> dict[str, Any]:
    """One JSON artifact of this package, e.g. ``load("search-parameters.json")``."""
    return json.loads((HERE / name).read_text(encoding="utf-8"))  # type: ignore[no-any-return]
