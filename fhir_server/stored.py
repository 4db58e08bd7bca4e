"""One stored version of a resource, what every read of the store returns, and what a read asks for."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson


@dataclass(frozen=True)
class Stored:
    """One version of a resource as stored: its JSON text and version metadata."""

    type: str
    id: str
    version: int
    last_updated: datetime
    content: str | None  # None for a deletion

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def resource(self) -> dict[str, Any]:
        return orjson.loads(self.content) if self.content else {}


class ReadTarget(NamedTuple):
    """What a read or vread asks for."""

    type: str
    id: str
    version: int | None  # a vread's
