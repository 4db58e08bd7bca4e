"""What a role's compartment costs: each role's read and searches beside a client without a role.

    python -m bench.compartments --cases 1000 --url sqlite:////tmp/compart.db

Loads ``--cases`` second-opinion cases (``testbed.roles``: each client's compartment holds half
of them) into an empty database, or reuses one it loaded before, then prints the median of
``--repeat`` requests, in milliseconds, in process (TestClient: no network).
"""

import argparse
import statistics
import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import text

from fhir_server.db import Database
from overread.migrate import upgrade
from testbed import roles

CLIENTS = ("admin", "ehr-a", "reader-1", "insurer-1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--url", default="sqlite:////tmp/overread-compartments.db")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    db = Database(args.url)
    upgrade(db.engine)
    client = roles.app_client(db)
    with client:
        task = _load(client, db, args.cases)
        print(f"{args.cases} cases, {db.engine.dialect.name}, median of {args.repeat} (ms)")
        print("| client | Task search | ServiceRequest search | read of a Task |")
        print("| --- | --- | --- | --- |")
        for client_id in CLIENTS:
            headers = roles.token(client, client_id)
            paths = ("Task?status=requested&_count=20", "ServiceRequest?_count=20&_total=accurate", f"Task/{task}")
            figures = [_median(_get(client, path, headers), args.repeat) for path in paths]
            print(f"| {client_id} | " + " | ".join(f"{f:.1f}" for f in figures) + " |")
    db.dispose()


def _load(client: TestClient, db: Database, count: int) -> str:
    """The cases (loaded unless there are); the id of the first case's Task (in every client's compartment)."""
    with db.engine.connect() as conn:
        stored = conn.scalar(text("SELECT count(*) FROM resource WHERE type = 'ServiceRequest'"))
    if not stored:
        roles.load(client, count)
        with db.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    elif stored != count:
        raise SystemExit(f"the database holds {stored} cases, not {count}")
    admin = roles.token(client, "admin")
    first = client.get("/fhir/ServiceRequest?identifier=ACSN-0", headers=admin).json()["entry"][0]["resource"]["id"]
    found = client.get(f"/fhir/Task?focus=ServiceRequest/{first}", headers=admin).json()
    return str(found["entry"][0]["resource"]["id"])


def _get(client: TestClient, path: str, headers: dict[str, str]) -> Callable[[], None]:
    def get() -> None:
        if (status := client.get(f"/fhir/{path}", headers=headers).status_code) != 200:
            raise SystemExit(f"{path} answered {status}")

    return get


def _median(request: Callable[[], None], repeat: int) -> float:
    request()  # warm: the compartment, the statement cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        request()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    main()
