"""``Lookup``: the reads a rule may make of the store before a write (a ``Repository`` is one).

The profile rules (``fhir_server.profiles``) run inside validation, before the repository writes,
and the rules the app adds to them take the store as a ``Lookup`` so they need not import it.
"""

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fhir_server.repository import Stored


class Lookup(Protocol):
    """The current version of a resource, and the current resources whose ``param`` refers to ``target``."""

    def current(self, resource_type: str, resource_id: str) -> "Stored | None": ...

    def referring(self, resource_type: str, param: str, target: str) -> "list[Stored]": ...
