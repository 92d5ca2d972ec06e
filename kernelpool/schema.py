"""The database's schema and its versions: what `kernelpool.store.Store.open` brings every
database up to (the migrations run there, in one transaction)."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name        TEXT PRIMARY KEY,
    uid         INTEGER NOT NULL UNIQUE,
    gid         INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    limits      TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    hash        TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    expires_at  REAL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS kernels (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    notebook    TEXT,
    pid         INTEGER,
    cgroup      TEXT,
    connection_file TEXT,
    started_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          REAL NOT NULL,
    user        TEXT,
    tool        TEXT NOT NULL,
    notebook    TEXT,
    outcome     TEXT NOT NULL,
    duration_ms REAL NOT NULL,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS audit_user_ts ON audit(user, ts);
"""


# The schema's version, kept in the database header (PRAGMA user_version). MIGRATIONS[n] takes a
# database from version n to n + 1; all pending ones run at start, in one transaction. Version
# 0 is both a new, empty file and a database made before there were versions (up to commit
# bcda1e3), whose tables migration 1's IF NOT EXISTS statements leave as they were. Append a
# migration for every change of what is stored; never edit one that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    tuple(statement.strip() for statement in SCHEMA.split(";") if statement.strip()),
    # 2: users being removed (`users remove` marks them first: their tokens stop working at once)
    ("CREATE TABLE removing (user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE, since REAL NOT NULL)",),
    # 3: no uid and no Unix account name is given twice. `uid_mark` is the highest uid ever given
    # (new ones go above it); `removed_users` keeps each removed user's name, uid and account, so
    # that a name added again gets an account of another name. A database from before this
    # version does not know what it removed before: the mark starts at the highest uid in use
    # (`UserService` also stays above the owners of the folders in DATA/users), and the names of
    # removed users are those the audit log still shows (uid and account unknown).
    (
        "ALTER TABLE users ADD COLUMN reissued INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE removed_users (name TEXT NOT NULL, uid INTEGER, account TEXT, removed_at REAL)",
        "CREATE INDEX removed_users_name ON removed_users(name)",
        "CREATE TABLE uid_mark (one INTEGER PRIMARY KEY CHECK (one = 1), uid INTEGER NOT NULL)",
        "INSERT INTO uid_mark(one, uid) SELECT 1, uid FROM users ORDER BY uid DESC LIMIT 1",
        "INSERT INTO removed_users(name) SELECT DISTINCT user FROM audit"
        " WHERE user IS NOT NULL AND user NOT IN (SELECT name FROM users)",
    ),
    # 4: kernelpool as its own OAuth 2.1 authorization server (kernelpool/users/grants.py). A grant is
    # one person's consent to one client; its access tokens live in `tokens` (grant_id set, bound to
    # `resource`), its refresh tokens and single-use codes in tables of their own, all as hashes.
    # Clients registered by DCR are kept; CIMD clients are fetched and cached in memory. Removing a
    # user drops their grants, codes, tokens and sign-in links (ON DELETE CASCADE).
    (
        "CREATE TABLE oauth_clients (client_id TEXT PRIMARY KEY, metadata TEXT NOT NULL, created_at REAL NOT NULL)",
        "CREATE TABLE oauth_grants (id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,"
        " client_id TEXT NOT NULL, client_name TEXT, scopes TEXT NOT NULL, resource TEXT NOT NULL,"
        " created_at REAL NOT NULL, used_at REAL, revoked_at REAL, revoked_why TEXT)",
        "CREATE INDEX oauth_grants_user ON oauth_grants(user)",
        "CREATE TABLE oauth_codes (hash TEXT PRIMARY KEY, grant_id TEXT NOT NULL REFERENCES oauth_grants(id) ON DELETE CASCADE,"
        " redirect_uri TEXT NOT NULL, redirect_explicit INTEGER NOT NULL, code_challenge TEXT NOT NULL,"
        " expires_at REAL NOT NULL, used_at REAL)",
        "CREATE TABLE oauth_refresh (hash TEXT PRIMARY KEY, grant_id TEXT NOT NULL REFERENCES oauth_grants(id) ON DELETE CASCADE,"
        " created_at REAL NOT NULL, expires_at REAL, used_at REAL)",
        "CREATE INDEX oauth_refresh_grant ON oauth_refresh(grant_id)",
        "ALTER TABLE tokens ADD COLUMN grant_id TEXT REFERENCES oauth_grants(id) ON DELETE CASCADE",
        "ALTER TABLE tokens ADD COLUMN resource TEXT",
        "CREATE INDEX tokens_grant ON tokens(grant_id)",
        "CREATE TABLE login_links (hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,"
        " created_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL)",
    ),
    # 5: the read-only web view (kernelpool/web/view.py). Operators are users with `admin` set (`kernelpool
    # users set-admin`); each audit row names the MCP client that made the call (its clientInfo), which a
    # person's activity page shows.
    (
        "ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE audit ADD COLUMN client TEXT",
    ),
    # 6: several replicas behind HAProxy (docs/scale-out.md). Each user has a home replica (`home`;
    # NULL on a single node) and a stable, opaque key (`ukey`) that its tokens carry, so that the
    # proxy routes by it; tokens minted before keys existed have `keyed` 0 and route by their id.
    # Kernel and audit rows carry the replica that wrote them. `replicas` lists those that run
    # (and how loaded they are); `moves` and `move_chunks` carry a user's folder from one replica
    # to another through the database; `changes` counts the writes that can end a login (read when
    # PostgreSQL's LISTEN connection is lost). Keys of existing users are drawn in `Store.open`.
    (
        "ALTER TABLE users ADD COLUMN home TEXT",
        "ALTER TABLE users ADD COLUMN ukey TEXT",
        "CREATE UNIQUE INDEX users_ukey ON users(ukey)",
        "ALTER TABLE tokens ADD COLUMN keyed INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE kernels ADD COLUMN replica TEXT",
        "ALTER TABLE audit ADD COLUMN replica TEXT",
        "CREATE TABLE replicas (name TEXT PRIMARY KEY, started_at REAL NOT NULL, seen_at REAL NOT NULL,"
        " kernels INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE moves (user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE, source TEXT NOT NULL,"
        " target TEXT NOT NULL, state TEXT NOT NULL, started_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " files BIGINT, bytes BIGINT, error TEXT)",
        "CREATE TABLE move_chunks (user TEXT NOT NULL REFERENCES moves(user) ON DELETE CASCADE, seq INTEGER NOT NULL,"
        " data BLOB NOT NULL, PRIMARY KEY (user, seq))",
        "CREATE TABLE changes (one INTEGER PRIMARY KEY CHECK (one = 1), n BIGINT NOT NULL)",
        "INSERT INTO changes(one, n) VALUES (1, 0)",
    ),
)
