"""Unit of work and repository overhead against the raw baselines, in one run.

    python benchmarks/bench_uow.py

Primary-key reads: raw psycopg2 vs plain SQLAlchemy ORM ``session.get`` vs
repository ``get`` (uncached; identity map emptied after each read).
Updates: raw psycopg2 UPDATE+COMMIT vs plain ORM get+update+commit at
SERIALIZABLE vs repository update in a UnitOfWork at SERIALIZABLE.
Targets: repository get <= 1.10x plain ORM get; UnitOfWork update <= 1.25x
plain ORM update.
"""

from __future__ import annotations

import itertools
import random

import psycopg2
from _common import bench_database, interleaved_us, iterations, print_table
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from orchestrator_data import DataLayer, Settings
from orchestrator_data.config import sqlalchemy_url
from orchestrator_data.models import Agent

N_AGENTS = 1000


def libpq_dsn(url: str) -> str:
    u = make_url(url)
    parts = {
        "dbname": u.database,
        "user": u.username,
        "host": u.host or u.query.get("host"),
        "port": u.port,
        "password": u.password,
    }
    return " ".join(f"{k}={v}" for k, v in parts.items() if v)


def main() -> None:
    with bench_database() as servers:
        url = sqlalchemy_url(servers.database_url)
        # The unit of work's own cost: no cache, no audit rows (bench_audit.py
        # measures those); the change capture stays on.
        settings = Settings(
            database_url=url, redis_url=servers.redis_url, cache_enabled=False, audit_enabled=False
        )
        dl = DataLayer(settings)
        with dl.unit_of_work() as uow:
            ids = [uow.agents.create(name=f"bench-{i}", role="r").id for i in range(N_AGENTS)]
            uow.commit()
        pick = itertools.cycle(random.Random(1).sample(ids, len(ids))).__next__
        statuses = itertools.cycle(["idle", "busy", "active"]).__next__

        raw = psycopg2.connect(libpq_dsn(servers.database_url))
        raw.autocommit = False
        cur = raw.cursor()

        def raw_get() -> None:
            cur.execute("SELECT * FROM agents WHERE id = %s", (str(pick()),))
            cur.fetchone()

        engine = create_engine(url, pool_size=5, isolation_level="SERIALIZABLE")
        factory = sessionmaker(engine, expire_on_commit=False)

        orm_session: Session = factory()

        def orm_get() -> None:
            obj = orm_session.get(Agent, pick())
            orm_session.expunge(obj)

        uow_cm = dl.unit_of_work()
        uow = uow_cm.__enter__()

        def repo_get() -> None:
            obj = uow.agents.get(pick())
            uow.session.expunge(obj)

        reads = interleaved_us(
            {"raw": raw_get, "orm": orm_get, "repo": repo_get}, iterations=iterations(4000)
        )
        raw_get_us, orm_get_us, repo_get_us = reads["raw"], reads["orm"], reads["repo"]
        raw.commit()
        orm_session.close()
        uow_cm.__exit__(None, None, None)

        def raw_update() -> None:
            cur.execute(
                "UPDATE agents SET status = %s, updated_at = clock_timestamp() WHERE id = %s",
                (statuses(), str(pick())),
            )
            raw.commit()

        def orm_update() -> None:
            with factory() as session:
                obj = session.get(Agent, pick())
                assert obj is not None
                obj.status = statuses()
                session.commit()

        def uow_update() -> None:
            with dl.unit_of_work() as u:
                u.agents.update(pick(), status=statuses())
                u.commit()

        def uow_open_close() -> None:
            with dl.unit_of_work():
                pass

        writes = interleaved_us(
            {"raw": raw_update, "orm": orm_update, "uow": uow_update, "open": uow_open_close},
            iterations=iterations(2000),
        )
        raw_upd_us, orm_upd_us = writes["raw"], writes["orm"]
        uow_upd_us, uow_open_us = writes["uow"], writes["open"]

        print_table(
            "Primary-key read (uncached)",
            [
                ("raw psycopg2 SELECT", raw_get_us, "raw", 1.0),
                ("plain ORM session.get", orm_get_us, "raw", orm_get_us / raw_get_us),
                ("repository get", repo_get_us, "plain ORM", repo_get_us / orm_get_us),
            ],
        )
        print_table(
            "Update + commit at SERIALIZABLE",
            [
                ("raw psycopg2 UPDATE+COMMIT", raw_upd_us, "raw", 1.0),
                ("plain ORM get+update+commit", orm_upd_us, "raw", orm_upd_us / raw_upd_us),
                ("UnitOfWork repository update", uow_upd_us, "plain ORM", uow_upd_us / orm_upd_us),
                (
                    "UnitOfWork open+close alone",
                    uow_open_us,
                    "plain ORM update",
                    uow_open_us / orm_upd_us,
                ),
            ],
        )
        print(
            f"\ntargets: repository get <= 1.10x plain ORM ({repo_get_us / orm_get_us:.2f}x), "
            f"UnitOfWork update <= 1.25x plain ORM ({uow_upd_us / orm_upd_us:.2f}x)"
        )
        cur.close()
        raw.close()
        engine.dispose()
        dl.close()


if __name__ == "__main__":
    main()
