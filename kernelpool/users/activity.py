"""What the audit log says about people, for the web view: one user's recent tool calls (their
activity page) and, for operators, recent failures per user. Rows are read newest first and in
pages (`before` is the id of the last row shown). Callers: `kernelpool.web.view`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernelpool.store import Store

# one query, its filters switched by parameters: the tool calls (`tools`: not the rows of the
# sign-in pages and the authorization server), rows older than `before`
_RECENT = ("SELECT id, ts, user, client, tool, notebook, outcome, duration_ms, detail FROM audit"
           " WHERE user = ? AND (CAST(? AS BIGINT) IS NULL OR id < ?)"
           " AND (? = 0 OR (tool NOT IN ('signin', 'consent', 'register', 'token', 'client', 'revoke')"
           " AND tool NOT LIKE 'auth.%' AND tool NOT LIKE 'view.%'))"
           " ORDER BY id DESC LIMIT ?")


@dataclass(frozen=True)
class Row:
    id: int
    ts: float
    user: str | None
    client: str | None
    tool: str
    notebook: str | None
    outcome: str
    duration_ms: float
    detail: str | None


async def recent(store: Store, user: str, *, limit: int = 50, before: int | None = None,
                 tools_only: bool = False) -> list[Row]:
    """`user`'s audit rows, newest first: at most `limit`, older than row `before` when given."""
    return [Row(**dict(r)) for r in await store.rows(_RECENT, user, before, before, int(tools_only), limit)]


async def failures(store: Store, since: float) -> dict[str, tuple[int, str | None]]:
    """Per user: how many tool calls failed or were refused since `since`, and the newest one's tool."""
    sql = ("SELECT user, COUNT(*) AS n, MAX(id) AS last FROM audit WHERE ts >= ? AND user IS NOT NULL"
           " AND outcome != 'ok' GROUP BY user")
    out: dict[str, tuple[int, str | None]] = {}
    for row in await store.rows(sql, since):
        last = await store.value("SELECT tool FROM audit WHERE id = ?", row["last"])
        out[row["user"]] = (int(row["n"]), last)
    return out
