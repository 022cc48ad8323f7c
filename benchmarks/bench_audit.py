"""The cost of the audit trail, against plain SQLAlchemy and SQLAlchemy-Continuum.

    python benchmarks/bench_audit.py

Reads DATABASE_URL (or starts the embedded servers), creates its own
database and drops it at the end. In one run, interleaved:

- single update + commit at SERIALIZABLE: raw psycopg2; plain ORM
  get+update+commit; repository update in a unit of work with the audit
  trail on, and with it off (change capture only);
- bulk ``update(Agent)`` of 1,000 rows + commit: plain ORM session; unit of
  work with the audit trail (1,000 audit rows); unit of work without it;
- then, with SQLAlchemy-Continuum versioning the same agents table (same rows,
  same indexes): the same single and bulk updates through a plain ORM session,
  measured against plain ORM again in that phase, since Continuum hooks every
  engine in the process.

Targets: single update with audit <= 1.35x plain ORM, and well under
Continuum's; bulk update with audit <= 2x the bulk update without.
"""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import datetime
from typing import Any

import psycopg2
from _common import bench_database, interleaved_us, iterations, print_table
from bench_uow import libpq_dsn
from sqlalchemy import CursorResult, DateTime, String, create_engine, func, select, update
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from orchestrator_data import DataLayer, Settings
from orchestrator_data.config import sqlalchemy_url
from orchestrator_data.models import Agent, AuditLog

N_AGENTS = 1000
BULK_ROWS = 1000


def main() -> None:
    with bench_database("od_bench_audit") as servers:
        url = sqlalchemy_url(servers.database_url)
        settings = Settings(database_url=url, redis_url=servers.redis_url, cache_enabled=False)
        dl = DataLayer(settings)
        # Same change capture (the cache uses it too), no audit writer: what
        # the audit rows themselves cost.
        dl_off = DataLayer(settings.with_overrides(audit_enabled=False))
        with dl.unit_of_work() as uow:
            ids = [uow.agents.create(name=f"one-{i}", role="r").id for i in range(N_AGENTS)]
            for i in range(BULK_ROWS):
                uow.agents.create(name=f"bulk-{i}", role="bulk")
            uow.commit()
        pick = itertools.cycle(random.Random(1).sample(ids, len(ids))).__next__
        counter = itertools.count()

        def next_status() -> str:
            return f"s{next(counter) % 7}"  # always a real change: an audit row each time

        raw = psycopg2.connect(libpq_dsn(servers.database_url))
        raw.set_session(isolation_level="SERIALIZABLE")
        cur = raw.cursor()

        def raw_update() -> None:
            cur.execute(
                "UPDATE agents SET role = %s, updated_at = clock_timestamp() WHERE id = %s",
                (next_status(), str(pick())),
            )
            raw.commit()

        engine = create_engine(url, pool_size=5, isolation_level="SERIALIZABLE")
        factory = sessionmaker(engine, expire_on_commit=False)

        def orm_update() -> None:
            with factory() as session:
                obj = session.get(Agent, pick())
                assert obj is not None
                obj.role = next_status()
                session.commit()

        def uow_update(layer: DataLayer) -> Any:
            def run() -> None:
                with layer.unit_of_work() as u:
                    u.agents.update(pick(), role=next_status())
                    u.commit()

            return run

        single = interleaved_us(
            {
                "raw": raw_update,
                "orm": orm_update,
                "audit": uow_update(dl),
                "off": uow_update(dl_off),
            },
            iterations=iterations(2000),
        )

        bulk_where = Agent.role.in_(["bulk", "bulk2"])
        flip = itertools.cycle(["bulk", "bulk2"]).__next__

        def orm_bulk() -> None:
            with factory() as session:
                session.execute(update(Agent).where(bulk_where).values(role=flip()))
                session.commit()

        def uow_bulk(layer: DataLayer) -> Any:
            def run() -> None:
                with layer.unit_of_work() as u:
                    result = u.session.execute(update(Agent).where(bulk_where).values(role=flip()))
                    assert isinstance(result, CursorResult)  # a bulk UPDATE's: rowcount
                    assert result.rowcount == BULK_ROWS
                    u.commit()

            return run

        bulk = interleaved_us(
            {"orm": orm_bulk, "audit": uow_bulk(dl), "off": uow_bulk(dl_off)},
            iterations=iterations(60),
            batch=1,
            warmup=3,
        )
        with dl.unit_of_work(read_only=True) as uow:
            audited = uow.session.scalar(
                select(func.count())
                .select_from(AuditLog)
                .where(AuditLog.metadata_["bulk"].isnot(None))
            )
        assert audited is not None
        assert audited >= BULK_ROWS

        cont = continuum_phase(url, factory, pick, next_status)

        print_table(
            "Single update + commit at SERIALIZABLE",
            [
                ("raw psycopg2 UPDATE+COMMIT", single["raw"], "raw", 1.0),
                (
                    "plain ORM get+update+commit",
                    single["orm"],
                    "raw",
                    single["orm"] / single["raw"],
                ),
                (
                    "UnitOfWork update, audit off",
                    single["off"],
                    "plain ORM",
                    single["off"] / single["orm"],
                ),
                (
                    "UnitOfWork update, audit on",
                    single["audit"],
                    "plain ORM",
                    single["audit"] / single["orm"],
                ),
                (
                    "Continuum: plain ORM, versioned",
                    cont["single"],
                    "plain ORM*",
                    cont["single"] / cont["orm"],
                ),
            ],
        )
        print_table(
            f"Bulk update(Agent) of {BULK_ROWS} rows + commit",
            [
                ("plain ORM session.execute", bulk["orm"], "plain ORM", 1.0),
                ("UnitOfWork, audit off", bulk["off"], "plain ORM", bulk["off"] / bulk["orm"]),
                (
                    "UnitOfWork, audit on (1,000 rows)",
                    bulk["audit"],
                    "plain ORM",
                    bulk["audit"] / bulk["orm"],
                ),
                (
                    "Continuum (writes no versions)",
                    cont["bulk"],
                    "plain ORM*",
                    cont["bulk"] / cont["orm_bulk"],
                ),
            ],
        )
        print(
            "\n*: plain ORM measured again alongside Continuum, whose listeners hook every engine."
        )
        single_ratio = single["audit"] / single["orm"]
        continuum_ratio = cont["single"] / cont["orm"]
        print(
            f"\ntargets: single update with audit <= 1.35x plain ORM "
            f"({single_ratio:.2f}x; Continuum {continuum_ratio:.2f}x), "
            f"bulk update with audit <= 2x without ({bulk['audit'] / bulk['orm']:.2f}x plain ORM, "
            f"{bulk['audit'] / bulk['off']:.2f}x unit of work with audit off)"
        )
        cur.close()
        raw.close()
        engine.dispose()
        dl.close()
        dl_off.close()


def continuum_phase(
    url: str, factory: sessionmaker[Session], pick: Any, next_status: Any
) -> dict[str, float]:
    """Version the agents table with SQLAlchemy-Continuum (a second mapping of
    it, so the package's models stay unversioned) and time the same updates,
    and plain ORM again under the same process-wide hooks."""
    import sqlalchemy as sa
    from sqlalchemy_continuum import make_versioned

    make_versioned(user_cls=None)

    class VBase(DeclarativeBase):
        pass

    class VersionedAgent(VBase):
        __tablename__ = "agents"
        __versioned__: dict[str, Any] = {}

        id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
        name: Mapped[str] = mapped_column(String(255), unique=True)
        role: Mapped[str] = mapped_column(String(100))
        status: Mapped[str] = mapped_column(String(50), default="idle")
        capabilities: Mapped[list[Any]] = mapped_column(JSONB, default=list)
        metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
        created_at: Mapped[datetime] = mapped_column(
            DateTime(timezone=True), server_default=func.clock_timestamp()
        )
        updated_at: Mapped[datetime] = mapped_column(
            DateTime(timezone=True),
            server_default=func.clock_timestamp(),
            onupdate=func.clock_timestamp(),
        )

    sa.orm.configure_mappers()
    engine = create_engine(url, pool_size=5, isolation_level="SERIALIZABLE")
    VBase.metadata.create_all(engine)  # agents exists: adds agents_version, transaction
    vfactory = sessionmaker(engine, expire_on_commit=False)

    def continuum_update() -> None:
        with vfactory() as session:
            obj = session.get(VersionedAgent, pick())
            assert obj is not None
            obj.role = next_status()
            session.commit()

    def orm_update() -> None:
        with factory() as session:
            obj = session.get(Agent, pick())
            assert obj is not None
            obj.role = next_status()
            session.commit()

    single = interleaved_us(
        {"continuum": continuum_update, "orm": orm_update}, iterations=iterations(1000)
    )
    flip = itertools.cycle(["bulk", "bulk2"]).__next__

    def continuum_bulk() -> None:
        with vfactory() as session:
            session.execute(
                update(VersionedAgent)
                .where(VersionedAgent.role.in_(["bulk", "bulk2"]))
                .values(role=flip())
            )
            session.commit()

    def orm_bulk() -> None:
        with factory() as session:
            session.execute(
                update(Agent).where(Agent.role.in_(["bulk", "bulk2"])).values(role=flip())
            )
            session.commit()

    bulk = interleaved_us(
        {"continuum": continuum_bulk, "orm": orm_bulk},  # (Continuum versions none of these)
        iterations=iterations(30),
        batch=1,
        warmup=3,
    )
    engine.dispose()
    return {
        "single": single["continuum"],
        "orm": single["orm"],
        "bulk": bulk["continuum"],
        "orm_bulk": bulk["orm"],
    }


if __name__ == "__main__":
    main()
