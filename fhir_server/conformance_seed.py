"""Publish the conformance artifacts of ``conformance/`` into the store, so the server serves them.

``publish(executor)`` runs at every start-up (``overread.app.create_app``) and is idempotent: an
artifact is found by ``url`` and ``version`` (a conditional update); one that is stored
unchanged costs one read by id and writes nothing, so a restart writes no new versions.
"""

from typing import Any

from fhir_server.executor import Executor
from fhir_server.profiles import artifacts
from fhir_server.repository import Repository, same_content


def publish(executor: Executor) -> int:
    """Store every artifact that is missing or changed; the number written."""
    written = 0
    with executor.begin() as conn:
        repo = Repository(conn)
        for artifact in artifacts():
            written += _publish(repo, artifact)
    return written


def _publish(repo: Repository, artifact: dict[str, Any]) -> int:
    rtype, rid = artifact["resourceType"], artifact["id"]
    current = repo.current(rtype, rid)
    if current is not None and same_content(current.resource, artifact):  # a deletion reads as {}
        return 0  # the usual case at start-up: one read, nothing written
    criteria = [("url", artifact["url"]), ("version", artifact["version"])]
    found = repo.search(rtype, criteria)
    if found and same_content(found[0].resource, artifact):
        return 0
    if found:
        rid = found[0].id
    elif current is not None and current.content is not None and current.resource.get("url") != artifact["url"]:
        repo.create(dict(artifact))  # the id is someone else's resource: ours gets a new one
        return 1
    repo.update(rtype, rid, {**artifact, "id": rid})
    return 1
