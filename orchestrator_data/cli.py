"""The ``orchestrator-data`` command line: demo, migrations, the audit trail.

Only click and the standard library are imported at start-up; each command
imports what it needs (SQLAlchemy, Redis, the DataLayer) when it runs, so
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import getpass
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from orchestrator_data.actor import SYSTEM, Actor
from orchestrator_data.errors import OrchestratorDataError, ValidationError, sqlstate_of

if TYPE_CHECKING:
    from orchestrator_data.datalayer import DataLayer


@click.group()
@click.option(
    "--data-dir",
    default=None,
    help="Folder of the embedded servers (default ./.orchestrator_data), used when "
    "DATABASE_URL / REDIS_URL are not set.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None, verbose: bool) -> None:
    """PostgreSQL + Redis persistence layer of the agent orchestrator."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # The embedded servers' start-up lines, plain on stderr with or without -v (and not twice).
    status = logging.getLogger("orchestrator_data.embedded.status")
    if not status.handlers:
        status.addHandler(logging.StreamHandler())
    status.setLevel(logging.INFO)
    status.propagate = False
    # main() reads "verbose" back (it passes this dict in as obj) to decide on tracebacks.
    ctx.ensure_object(dict).update(data_dir=data_dir, verbose=verbose)


@cli.command()
@click.option("--agents", default=8, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--tasks", default=200, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--failure-rate", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=None, type=int, help="Seed for repeatable runs.")
@click.pass_context
def demo(
    ctx: click.Context, agents: int, tasks: int, workers: int, failure_rate: float, seed: int | None
) -> None:
    """Migrate, register agents, enqueue tasks, and let agents work them off."""
    from orchestrator_data.config import redact_url
    from orchestrator_data.datalayer import DataLayer
    from orchestrator_data.demo import run_demo
    from orchestrator_data.embedded.servers import resolve_settings

    with resolve_settings(data_dir=ctx.obj["data_dir"]) as settings:
        click.echo(f"database: {redact_url(settings.database_url or '')}")
        click.echo(f"redis:    {redact_url(settings.redis_url or '')}")
        with DataLayer(settings.with_overrides(pool_max=max(settings.pool_max, workers + 2))) as dl:
            dl.migrate("head")
            run = partial(
                run_demo, dl, agents=agents, tasks=tasks, workers=workers,
                failure_rate=failure_rate, seed=seed,
            )  # fmt: skip
            if sys.stdout.isatty():
                with click.progressbar(length=tasks, label="tasks done") as bar:
                    report = run(on_progress=bar.update)
                click.echo("")
            else:  # a log or a pipe gets the report alone
                report = run()
    click.echo(f"run {report.run_id}: {report.agents} agents, {report.tasks} tasks")
    click.echo(f"  finished in {report.seconds:.2f} s")
    for status in ("pending", "assigned", "in_progress", "completed", "failed"):
        click.echo(f"  {status:<12} {report.by_status.get(status, 0):>7}")
    click.echo(f"  failed attempts (retried or final): {report.attempts_failed}")
    click.echo(f"  transactions: {report.transactions} ({report.ops_per_second:.0f}/s)")
    click.echo(f"  serialization retries: {report.retries}")
    if report.gave_up:
        click.echo(f"  transactions that exhausted their retries, run again: {report.gave_up}")
    click.echo(f"  achievements awarded: {report.achievements}")
    if not report.leaderboard:
        click.echo("leaderboard of this run's agents: no points yet")
    else:
        click.echo(f"leaderboard of this run's agents (top {len(report.leaderboard)}):")
    for rank, (name, points) in enumerate(report.leaderboard, start=1):
        click.echo(f"  {rank:>2}. {name:<32} {points:>6} pts")
    c = report.cache
    if c:
        click.echo(
            f"  cache hit ratio: {c['hit_ratio']:.2f} (L1 hits {c['l1_hits']:.0f}, "
            f"L2 hits {c['l2_hits']:.0f}, database reads {c['loads']:.0f}; "
            f"{c['invalidations']:.0f} invalidations, {c['bypassed']:.0f} reads bypassed)"
        )


@cli.group()
def migrate() -> None:
    """Schema migrations (alembic): up, down, create, status."""


@migrate.command("up")
@click.argument("revision", default="head")
@click.pass_context
def migrate_up(ctx: click.Context, revision: str) -> None:
    """Apply migrations up to REVISION (default head)."""
    with _data_layer(ctx) as dl:
        dl.migrate(revision)
        click.echo(f"database at revision {dl.current_revision()}")


@migrate.command("down")
@click.argument("revision", default="-1")
@click.pass_context
def migrate_down(ctx: click.Context, revision: str) -> None:
    """Roll back to REVISION (default: one step back; 'base' removes everything)."""
    with _data_layer(ctx) as dl:
        dl.downgrade(revision)
        click.echo(f"database at revision {dl.current_revision() or 'base'}")


@migrate.command("status")
@click.pass_context
def migrate_status(ctx: click.Context) -> None:
    """Show the current revision and the pending ones."""
    from alembic.script import ScriptDirectory

    with _data_layer(ctx) as dl:
        script = ScriptDirectory.from_config(dl._alembic_config())
        current = dl.current_revision()
        head = script.get_current_head()
        click.echo(f"current: {current or 'base'}")
        click.echo(f"head:    {head}")
        pending = [
            rev
            for rev in reversed(list(script.walk_revisions()))
            if current is None or rev.revision > current
        ]
        for rev in pending:
            click.echo(f"pending: {rev.revision} {rev.doc.splitlines()[0] if rev.doc else ''}")
        if not pending:
            click.echo("up to date")


@migrate.command("create")
@click.argument("name")
@click.option("--empty", is_flag=True, help="Do not autogenerate from the models.")
@click.pass_context
def migrate_create(ctx: click.Context, name: str, empty: bool) -> None:
    """Create migration NNN_NAME, autogenerated from the models' difference
    with the database unless --empty."""
    from alembic.script import ScriptDirectory

    from alembic import command

    with _data_layer(ctx) as dl:
        cfg = dl._alembic_config()
        head = ScriptDirectory.from_config(cfg).get_current_head() or "000"
        rev_id = f"{int(head) + 1:03d}" if head.isdigit() else None
        with dl.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            script = command.revision(cfg, message=name, autogenerate=not empty, rev_id=rev_id)
        path = getattr(script, "path", None)
        click.echo(f"created {Path(path).name if path else rev_id}")


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    # A callback, not a ParamType: ParamType is generic only in recent click.
    from orchestrator_data.durations import parse_duration

    field = (param.name or "duration").replace("-", "_")
    try:
        return parse_duration(value, field)
    except ValidationError as err:
        raise click.BadParameter(" ".join(err.messages[field]).rstrip(".")) from None


@cli.group()
def audit() -> None:
    """The audit trail: the newest rows, a resource's history, pruning."""


@audit.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    callback=_duration,
    help="Delete rows older than this (e.g. 90d, 12h, 30m).",
)
@click.pass_context
def audit_prune(ctx: click.Context, older_than: timedelta) -> None:
    """Delete audit rows older than --older-than; the prune itself is audited."""
    from orchestrator_data.audit.retention import prune_audit_log

    with _data_layer(ctx) as dl:
        result = dl.run_in_transaction(
            lambda uow: prune_audit_log(uow, older_than), actor=_cli_actor()
        )
    click.echo(f"pruned {result.deleted} audit rows written before {result.cutoff.isoformat()}")


@audit.command("show")
@click.argument("resource_id")
@click.option("--type", "resource_type", default=None, help="Resource type (agent, task, ...).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def audit_show(ctx: click.Context, resource_id: str, resource_type: str | None, limit: int) -> None:
    """Print the history of RESOURCE_ID, oldest first, field by field
    ('audit recent' lists resource ids)."""
    from orchestrator_data.audit.history import history_lines

    with _data_layer(ctx) as dl, dl.unit_of_work(read_only=True) as uow:
        rows = uow.audit.history(resource_type, resource_id, limit=limit).items
        if not rows:
            raise click.ClickException(
                f"no audit rows for {resource_id} ('orchestrator-data audit recent' lists ids)"
            )
        for line in history_lines(rows):
            click.echo(line)


@cli.group()
def sessions() -> None:
    """The session store: purge the durable copies of expired sessions."""


@sessions.command("purge")
@click.pass_context
def sessions_purge(ctx: click.Context) -> None:
    """Delete expired sessions from PostgreSQL (each deletion audited);
    their Redis keys expire by their own TTL."""
    from orchestrator_data.actor import acting_as

    with _data_layer(ctx) as dl, acting_as(_cli_actor()):
        count = dl.session_store.purge_expired()
    click.echo(f"purged {count} expired session{'' if count == 1 else 's'}")


def _resource_type(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from orchestrator_data.models import RESOURCE_TYPES

    if value is not None and value not in RESOURCE_TYPES:
        known = ", ".join(RESOURCE_TYPES)
        raise click.BadParameter(f"{value!r} is not a resource type; known types: {known}")
    return value


@audit.command("recent")
@click.option(
    "--type",
    "resource_type",
    default=None,
    callback=_resource_type,
    help="Only rows of this resource type (agent, task, session, achievement, audit_log).",
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def audit_recent(ctx: click.Context, resource_type: str | None, limit: int) -> None:
    """Print the newest audit rows, newest first, with the resource ids that
    'audit show' takes. Prune rows (type audit_log) say what they removed."""
    from orchestrator_data.audit.history import recent_lines

    with _data_layer(ctx) as dl, dl.unit_of_work(read_only=True) as uow:
        page = uow.audit.list(resource_type=resource_type, descending=True, limit=limit)
        if not page.items:
            what = f"{resource_type} " if resource_type else ""
            click.echo(f"no {what}audit rows yet")
            return
        for line in recent_lines(page.items):
            click.echo(line)


def _cli_actor() -> Actor:
    # Who ran the command, as far as the operating system knows.
    try:
        return Actor("user", getpass.getuser())
    except (OSError, KeyError):
        return SYSTEM


@contextmanager
def _data_layer(ctx: click.Context) -> Iterator[DataLayer]:
    from orchestrator_data.datalayer import DataLayer
    from orchestrator_data.embedded.servers import resolve_settings

    with (
        resolve_settings(data_dir=ctx.obj["data_dir"]) as settings,
        DataLayer(settings.with_overrides(warm_pool=False)) as dl,
    ):
        yield dl


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``orchestrator-data``. Every expected failure (bad
    arguments, an unreachable server, a revision alembic cannot reach, an
    unmigrated database, any package error) is one line on stderr and a
    non-zero exit; ``-v`` prints the traceback first."""
    state: dict[str, object] = {}
    try:
        cli.main(args=argv, prog_name="orchestrator-data", standalone_mode=False, obj=state)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as err:
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        _fail(err.format_message() + where, err, state, exit_code=err.exit_code)
    except click.ClickException as err:
        _fail(err.format_message(), err, state, exit_code=err.exit_code)
    except OrchestratorDataError as err:
        _fail(str(err), err, state)
    except Exception as err:
        message = _expected_failure(err)
        if message is None:
            raise  # a bug: its traceback is what to report
        _fail(message, err, state)


#: SQLSTATEs of a schema that is missing or behind the code: undefined table,
#: column, function, schema.
_SCHEMA_MISSING = frozenset({"42P01", "42703", "42883", "3F000"})


def _expected_failure(err: Exception) -> str | None:
    """The line to print for an error that is not the package's but is still
    expected (a schema not migrated, alembic refusing, Redis down), else ``None``.
    Modules are looked up, not imported: only those in use can have raised."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(err, sa_exc.SQLAlchemyError):
        from orchestrator_data.db.driver_errors import WITHHELD

        # Driver text is scrubbed at the engine (no parameter values in it);
        # the driver's class name and the withheld-details note are noise here.
        first = re.sub(r"^\([\w.]+\) ", "", first).replace(WITHHELD, "").strip()
        if sqlstate_of(err) in _SCHEMA_MISSING:
            return (
                f"the database schema is missing or older than this release ({first}): "
                "run `orchestrator-data migrate up`"
            )
        return f"database: {first}"
    alembic_exc = sys.modules.get("alembic.util.exc")
    if alembic_exc is not None and isinstance(err, alembic_exc.CommandError):
        return f"migration: {first}"
    redis_exc = sys.modules.get("redis.exceptions")
    if redis_exc is not None and isinstance(err, redis_exc.RedisError):
        return f"redis: {first}"
    return None


def _fail(
    message: str, err: BaseException, state: dict[str, object], exit_code: int = 1
) -> NoReturn:
    # One line, whatever the message holds; the traceback only with -v.
    if state.get("verbose"):
        traceback.print_exception(err)
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(exit_code)
