"""What plain SQL text writes, as PostgreSQL's own parser reads it.

``session.execute(text(...))`` cannot be captured (no old values, no
affected rows), so a text statement that writes a protected table (the
tracked ones, and ``audit_logs``) is refused. The decision comes from the
parse tree of PostgreSQL's parser (``pglast`` wraps libpg_query), never from
patterns, so comments, quoting, schema names, CTEs, ``MERGE``, ``COPY FROM``
and several statements in one string are all seen for what they are.

Text whose targets cannot be determined is refused too: ``DO`` blocks,
``CALL``, ``EXECUTE`` of a prepared statement, and text that does not parse.
Limits: a function called from a ``SELECT`` runs with the caller's rights and
may write anything; PostgreSQL, not this guard, is the last line there (see
the README on running as a role that does not own ``audit_logs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError

#: Statement kinds whose effect cannot be read from the text itself.
_OPAQUE = (ast.DoStmt, ast.CallStmt, ast.ExecuteStmt)


class Undetermined(Exception):
    """The text's write targets cannot be told; ``str()`` says why."""


@lru_cache(maxsize=1024)
def written_relations(sql: str) -> frozenset[str]:
    """The names of the relations ``sql`` (one or more statements, with
    ``$n`` placeholders) writes or alters: INSERT, UPDATE, DELETE, MERGE,
    TRUNCATE, COPY FROM, SELECT INTO, and DDL naming a table (ALTER TABLE,
    DROP, CREATE TRIGGER or RULE, ...), wherever they appear (CTEs
    included). Raises :class:`Undetermined` when that cannot be told."""
    try:
        statements = parse_sql(sql)
    except ParseError as err:
        raise Undetermined(f"PostgreSQL's parser does not accept it ({err.args[0]})") from None
    names: set[str] = set()
    for raw in statements:
        if raw.stmt is not None:
            names.update(_written(raw.stmt))
    return frozenset(names)


def _written(node: ast.Node) -> Iterator[str]:
    for item in _walk(node):
        if isinstance(item, _OPAQUE):
            kind = type(item).__name__.removesuffix("Stmt").upper()
            raise Undetermined(f"what {kind} writes cannot be told from its text")
        if isinstance(item, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
            yield from _names(item.relation)
        elif isinstance(item, ast.TruncateStmt):
            yield from _names(item.relations)
        elif isinstance(item, ast.CopyStmt):
            if item.is_from:
                yield from _names(item.relation)
        elif isinstance(item, ast.SelectStmt) and item.intoClause is not None:
            yield from _names(item.intoClause.rel)
        elif isinstance(item, ast.DropStmt):
            for obj in item.objects or ():
                # Each object is a list of name parts (schema, table, and for a
                # trigger, rule or policy its own name): every part counts.
                for part in obj if isinstance(obj, tuple) else (obj,):
                    if isinstance(part, ast.String) and part.sval:
                        yield part.sval
        elif isinstance(
            item,
            (
                ast.AlterTableStmt,
                ast.CreateTrigStmt,
                ast.RuleStmt,
                ast.RenameStmt,
                ast.CreatePolicyStmt,
                ast.AlterPolicyStmt,
            ),
        ):
            yield from _names(getattr(item, "relation", None) or getattr(item, "table", None))


def _names(value: object) -> Iterator[str]:
    if isinstance(value, ast.RangeVar) and value.relname:
        yield value.relname
    elif isinstance(value, tuple):
        for item in value:
            yield from _names(item)


def _walk(node: object) -> Iterator[ast.Node]:
    """Every node under ``node`` (itself included), depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Node):
            yield item
            stack.extend(getattr(item, name) for name in item)
        elif isinstance(item, tuple):
            stack.extend(item)
