-- Nodes that join over the network: how they authenticate, their class and admin intent;
-- one-time join tokens; the rewards ledger (VM time served per node) and end-user ratings.

ALTER TABLE nodes ADD COLUMN remote INTEGER NOT NULL DEFAULT 0;            -- 1: runs `hive node`
ALTER TABLE nodes ADD COLUMN class TEXT NOT NULL DEFAULT 'participant';     -- or 'cloud'
ALTER TABLE nodes ADD COLUMN admin TEXT NOT NULL DEFAULT 'active';          -- active|cordoned|draining
ALTER TABLE nodes ADD COLUMN credential_hash TEXT;                          -- SHA-256 hex of the node's credential

CREATE TABLE join_tokens (
    hash       TEXT    PRIMARY KEY NOT NULL,  -- SHA-256 hex of the token; the token itself is never stored
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_by    INTEGER,                        -- node id it was exchanged for
    used_at    INTEGER
);

-- One row per user session that ended: cores x (ended_at - started_at) is what the node served.
-- Sessions still running are added from the live pools when the ledger is read.
CREATE TABLE served (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id    INTEGER NOT NULL,
    pool       TEXT    NOT NULL,
    handle     INTEGER NOT NULL,
    vm         INTEGER NOT NULL,
    cores      INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER NOT NULL
);
CREATE INDEX served_by_node ON served (node_id, ended_at);

CREATE TABLE ratings (
    pool            TEXT    NOT NULL,
    handle          INTEGER NOT NULL,
    session_started INTEGER NOT NULL,  -- with pool and handle, names one session even if ids are reused
    node_id         INTEGER NOT NULL,
    stars           INTEGER NOT NULL CHECK (stars BETWEEN 1 AND 5),
    comment         TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (pool, handle, session_started)
);
CREATE INDEX ratings_by_node ON ratings (node_id);
