"""The ``overread`` command line."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fhir_server.db import Database
from fhir_server.executor import for_database
from overread.migrate import upgrade
from overread.settings import get_settings

if TYPE_CHECKING:
    from mappings.sender import SenderConfig
    from mappings.v2 import Message

app = typer.Typer(help="Overread: radiology second-opinion interoperability server", no_args_is_help=True)
db_app = typer.Typer(help="Database schema", no_args_is_help=True)
app.add_typer(db_app, name="db")
hl7_app = typer.Typer(help="HL7 v2 tools", no_args_is_help=True)
app.add_typer(hl7_app, name="hl7")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the Alembic migrations to OVERREAD_DATABASE_URL."""
    settings = get_settings()
    db = Database(settings.database_url)
    upgrade(db.engine, revision)
    typer.echo(f"database {db.engine.url.render_as_string(hide_password=True)} is at {revision}")


@hl7_app.command("map")
def hl7_map(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    config: Annotated[
        Path | None, typer.Option(dir_okay=False, help="OVERREAD_CONFIG file (default: $OVERREAD_CONFIG)")
    ] = None,
    sender: Annotated[str, typer.Option(help="map with the hl7.senders entry of this name, whatever MSH-3/4 say")] = "",
) -> None:
    """Print the FHIR transaction Bundle an ORM^O01/OMI^O23/ORU^R01 file becomes (no database is touched).

    The file is mapped as intake maps it, with the settings of the first ``hl7.senders`` entry of
    the configuration that matches its MSH-3 and MSH-4 (or the entry ``--sender`` names). Which
    entry applied goes to stderr; stdout holds the Bundle alone, to pipe.
    """
    from mappings.errors import MappingError
    from mappings.orders import map_message
    from mappings.sender import sender_settings
    from mappings.v2 import parse
    from overread.config import ConfigError, load

    try:
        cfg = load(config or get_settings().config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    forced = cfg.sender_named(sender) if sender else None
    if sender and forced is None:
        named = [s.name for s in cfg.hl7.senders if s.name]
        typer.echo(f"no hl7.senders entry is named {sender!r} (named: {', '.join(named) or 'none'})", err=True)
        raise typer.Exit(2)
    try:
        message = parse(file.read_bytes())
        settings = forced or sender_settings(message, cfg.sender)
        typer.echo(_sender_line(message, settings, bool(forced)), err=True)
        bundle = map_message(message, settings)
    except MappingError as exc:
        typer.echo(f"error {exc.code} at {exc.location}: {exc.text}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(bundle, indent=2, ensure_ascii=False))


def _sender_line(message: "Message", settings: "SenderConfig | None", forced: bool) -> str:
    """Which sender entry maps the message, and what identifies its sender (keys its MSH-10)."""
    from mappings.sender import sender_identity

    msh = message.msh
    sent = f"MSH-3 {msh.field(3).value!r}, MSH-4 {msh.field(4).value!r}"
    if settings is None:
        entry = f"no hl7.senders entry matches {sent}: default settings"
    else:
        entry = f"{settings.name} ({'--sender' if forced else 'matches ' + sent})"
    identity = sender_identity(message, settings)
    fields = " + ".join(f"MSH-{n} {v!r}" for n, v in zip((3, 4), identity, strict=False))
    return f"sender: {entry}; identified by {fields}"


@hl7_app.command("oru")
def hl7_oru(
    report: Annotated[str, typer.Argument(help="DiagnosticReport/<id> in the database, or a JSON file")],
    version: Annotated[str, typer.Option("--version", help="HL7 version: 2.5.1 or 2.3.1")] = "",
    control_id: Annotated[str, typer.Option(help="MSH-10 (default: a new UUID)")] = "",
) -> None:
    """Print the ORU^R01 a second-opinion report would become (segments one per line; nothing is sent).

    REPORT is ``DiagnosticReport/<id>`` (read from OVERREAD_DATABASE_URL with its order, patient,
    interpreter and findings) or a JSON file {"report", "order", "patient", "interpreter", "findings",
    "envelope"} as in tests/golden/oru.
    """
    import dataclasses
    import uuid
    from datetime import UTC, datetime

    from sqlalchemy.exc import SQLAlchemyError

    from fhir_server.errors import FhirError
    from fhir_server.repository import Repository
    from hl7_bridge.oru_context import context_from_json, load_context
    from mappings.errors import MappingError
    from mappings.oru_r01 import SUPPORTED_VERSIONS, Envelope, oru_r01

    if version and version not in SUPPORTED_VERSIONS:
        typer.echo(f"--version must be one of {', '.join(SUPPORTED_VERSIONS)}", err=True)
        raise typer.Exit(2)
    fresh = Envelope(control_id=control_id or str(uuid.uuid4()), timestamp=datetime.now(UTC))
    try:
        if report.startswith("DiagnosticReport/"):
            db = Database(get_settings().database_url)
            try:
                with for_database(db).begin(write=False) as conn:
                    context = load_context(Repository(conn), report.removeprefix("DiagnosticReport/"))
            finally:
                db.dispose()
            envelope = fresh
        else:
            path = Path(report)
            if not path.is_file():
                typer.echo(f"{report} is neither DiagnosticReport/<id> nor a file", err=True)
                raise typer.Exit(2)
            context, given = context_from_json(json.loads(path.read_text(encoding="utf-8")))
            envelope = given or fresh
            if control_id:
                envelope = dataclasses.replace(envelope, control_id=control_id)
        if version:
            envelope = dataclasses.replace(envelope, version=version)
        message = oru_r01(context, envelope)
    except FhirError as exc:
        typer.echo(f"error {exc.status}: {exc}", err=True)
        raise typer.Exit(1) from exc
    except MappingError as exc:
        typer.echo(f"error {exc.code} at {exc.location}: {exc.text}", err=True)
        raise typer.Exit(1) from exc
    except SQLAlchemyError as exc:
        typer.echo(f"database error (is the schema there? overread db upgrade): {exc.__class__.__name__}", err=True)
        raise typer.Exit(1) from exc
    except (KeyError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(message.replace("\r", "\n"))


@hl7_app.command("send")
def hl7_send(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    host: Annotated[str, typer.Option(help="the MLLP listener's host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the MLLP listener's port")] = 2575,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the ACK")] = 30.0,
) -> None:
    """Send one v2 message file over MLLP and print the ACK (segments one per line)."""
    import asyncio

    from hl7_bridge.mllp import send

    # Files hold segments one per line, whatever the line end; on the wire they end in CR.
    message = b"\r".join(file.read_bytes().splitlines()).strip(b"\r") + b"\r"
    try:
        reply = asyncio.run(send(host, port, message, timeout))
    except (OSError, TimeoutError) as exc:
        typer.echo(f"no ACK from {host}:{port}: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(reply.decode("utf-8", errors="replace").replace("\r", "\n").rstrip("\n"))


@hl7_app.command("backfill")
def hl7_backfill(
    destination: Annotated[
        list[str] | None, typer.Option(metavar="NAME", help="only this destination (repeatable)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be queued; queue nothing")] = False,
) -> None:
    """Queue the results a destination never had: the latest result version of each second-opinion report
    with no message for it, as its filters (sending_facility, send_preliminary) want (docs/delivery.md)."""
    from hl7_bridge.backfill import UnknownDestination, backfill, table
    from overread.app import result_delivery
    from overread.config import ConfigError, load

    try:
        cfg = load(get_settings().config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    db = Database(get_settings().database_url)
    try:
        done = backfill(result_delivery(for_database(db), cfg).queue, destination or (), dry_run)
    except UnknownDestination as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    finally:
        db.dispose()
    typer.echo(table(done, dry_run))


@app.command()
def serve() -> None:
    """Run the server (FHIR REST API and the HL7 MLLP listener) until interrupted."""
    import asyncio

    from overread.app import serve_all
    from overread.config import load

    settings = get_settings()
    try:
        cfg = load(settings.config)
        settings.auth_mode()  # refused before anything listens
    except ValueError as exc:  # a ConfigError, or auth off beyond loopback
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    db = Database(settings.database_url, settings.pools, hide_parameters=not settings.log_sensitive)
    if db.engine.dialect.name == "sqlite":
        upgrade(db.engine)  # the embedded default keeps itself current
    asyncio.run(serve_all(settings, db, cfg))


@app.command()
def demo() -> None:
    """Run a whole second-opinion case end to end on the embedded defaults."""
    from overread.demo import run

    raise typer.Exit(run())


if __name__ == "__main__":
    app()
