-- Nodes that join over the network: how they authenticate, their class and admin intent;
-- one-time join tokens; the rewards ledger (VM time served per node) and end-user ratings.
-- Postgres twin of migrations/sqlite/0002_nodes.sql.

ALTER TABLE nodes ADD COLUMN remote BOOLEAN NOT NULL DEFAULT FALSE;         -- runs `hive node`
ALTER TABLE nodes ADD COLUMN class TEXT NOT NULL DEFAULT 'participant';     -- or 'cloud'
ALTER TABLE nodes ADD COLUMN admin TEXT NOT NULL DEFAULT 'active';          -- active|cordoned|draining
ALTER TABLE nodes ADD COLUMN credential_hash TEXT;                          -- SHA-256 hex of the node's credential

CREATE TABLE join_tokens (
    hash       TEXT    PRIMARY KEY NOT NULL,  -- SHA-256 hex of the token; the token itself is never stored
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL,
    used_by    BIGINT,                        -- node id it was exchanged for
    used_at    BIGINT
);

-- One row per user session that ended: cores x (ended_at - started_at) is what the node served.
-- Sessions still running are added from the live pools when the ledger is read.
CREATE TABLE served (
    id         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id    BIGINT  NOT NULL,
    pool       TEXT    NOT NULL,
    handle     BIGINT  NOT NULL,
    vm         BIGINT  NOT NULL,
    cores      BIGINT  NOT NULL,
    started_at BIGINT  NOT NULL,
    ended_at   BIGINT  NOT NULL
);
CREATE INDEX served_by_node ON served (node_id, ended_at);
CREATE INDEX served_by_handle ON served (pool, handle);

CREATE TABLE ratings (
    pool            TEXT    NOT NULL,
    handle          BIGINT  NOT NULL,
    session_started BIGINT  NOT NULL,  -- with pool and handle, names one session even if ids are reused
    node_id         BIGINT  NOT NULL,
    stars           BIGINT  NOT NULL CHECK (stars BETWEEN 1 AND 5),
    comment         TEXT    NOT NULL DEFAULT '',
    created_at      BIGINT  NOT NULL,
    PRIMARY KEY (pool, handle, session_started)
);
CREATE INDEX ratings_by_node ON ratings (node_id);
