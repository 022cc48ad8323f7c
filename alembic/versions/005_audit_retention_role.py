"""005-audit-retention-role: retention is the one way rows leave audit_logs.

Until now a transaction could ``SET LOCAL orchestrator_data.audit_prune = 'on'``
and delete any audit row. Now the append-only trigger lets a DELETE through
only when it runs as the role ``orchestrator_data_retention`` (NOLOGIN, so
nobody connects as it), and the only code that runs as that role is the
``SECURITY DEFINER`` function ``prune_audit_logs(older_than, ...)``: it
deletes only rows older than its cutoff and writes its own ``prune`` row in
the same statement. UPDATE and TRUNCATE are refused for everyone.

What this cannot stop: the owner of ``audit_logs`` (and any superuser) can
disable triggers. Run the application as a role that does not own the
tables (see the README's "Reliability and security").

The role is cluster-wide and created once; downgrading leaves it (other
databases may use it) but takes away what it was granted here.

Revision ID: 005
Revises: 004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "005"
down_revision: str | None = "004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "orchestrator_data_retention"
PRUNE_ARGS = "interval, text, text, inet, jsonb"

CREATE_ROLE = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        CREATE ROLE {ROLE} NOLOGIN;
    END IF;
END
$$
"""

GUARD_FUNCTION = f"""
CREATE OR REPLACE FUNCTION audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Inside prune_audit_logs (SECURITY DEFINER) current_user is its owner.
    IF TG_OP = 'DELETE' AND current_user = '{ROLE}' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old rows are removed only by orchestrator-data audit prune';
END;
$$
"""

OLD_GUARD_FUNCTION = """
CREATE OR REPLACE FUNCTION audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('orchestrator_data.audit_prune', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old rows are removed only by orchestrator-data audit prune';
END;
$$
"""

PRUNE_FUNCTION = """
CREATE FUNCTION prune_audit_logs(
    older_than interval, actor_type text, actor_id text, ip inet, metadata jsonb,
    OUT deleted bigint, OUT oldest timestamptz, OUT newest timestamptz, OUT cutoff timestamptz
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
BEGIN
    IF older_than IS NULL OR older_than <= interval '0' THEN
        RAISE EXCEPTION 'prune_audit_logs: older_than must be a positive interval'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    cutoff := now() - older_than;
    WITH gone AS (
        DELETE FROM audit_logs WHERE "timestamp" < cutoff RETURNING "timestamp"
    )
    SELECT count(*), min("timestamp"), max("timestamp") INTO deleted, oldest, newest FROM gone;
    INSERT INTO audit_logs (action, actor_type, actor_id, ip_address, resource_type,
                            resource_id, old_value, new_value, metadata)
    VALUES ('prune', actor_type, actor_id, ip, 'audit_log', NULL,
            jsonb_build_object('rows', deleted, 'oldest', oldest, 'newest', newest), NULL,
            coalesce(metadata, '{{}}'::jsonb) || jsonb_build_object(
                'txid', txid_current(),
                'cutoff', cutoff,
                'older_than_seconds', extract(epoch FROM older_than)));
END;
$$
"""


def upgrade() -> None:
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    op.execute(CREATE_ROLE)
    op.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {ROLE}')
    op.execute(f"GRANT SELECT, INSERT, DELETE ON audit_logs TO {ROLE}")
    op.execute(GUARD_FUNCTION)
    op.execute(PRUNE_FUNCTION.format(schema=f'"{schema}"'))
    op.execute(f"ALTER FUNCTION prune_audit_logs({PRUNE_ARGS}) OWNER TO {ROLE}")
    # Who may prune is granted, not assumed: the migrating role here (the
    # application role when it is the same); others by GRANT EXECUTE.
    op.execute(f"REVOKE ALL ON FUNCTION prune_audit_logs({PRUNE_ARGS}) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION prune_audit_logs({PRUNE_ARGS}) TO CURRENT_USER")


def downgrade() -> None:
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    op.execute(f"DROP FUNCTION prune_audit_logs({PRUNE_ARGS})")
    op.execute(OLD_GUARD_FUNCTION)
    op.execute(f"REVOKE ALL ON audit_logs FROM {ROLE}")
    op.execute(f'REVOKE USAGE ON SCHEMA "{schema}" FROM {ROLE}')
