-- Pools, their VMs, batches and handles, and the nodes that run them (Postgres twin of
-- migrations/sqlite/0001_init.sql). u64 values are stored as BIGINT (i64, bit for bit). Lists
-- that are only ever read and written whole (preparation queue, pending locks, a batch's VMs)
-- are JSON arrays in TEXT, byte for byte what the SQLite store keeps.

CREATE TABLE pools (
    name        TEXT    PRIMARY KEY NOT NULL,
    min         BIGINT  NOT NULL,
    max         BIGINT  NOT NULL,
    linger      BIGINT  NOT NULL,
    next_vm     BIGINT  NOT NULL,
    next_batch  BIGINT  NOT NULL,
    next_handle BIGINT  NOT NULL,
    preps       TEXT    NOT NULL DEFAULT '[]',  -- JSON array of batch ids, queue order
    pending     TEXT    NOT NULL DEFAULT '[]'   -- JSON array of {"batch":…,"handle":…}, queue order
);

CREATE TABLE vms (
    pool       TEXT    NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    id         BIGINT  NOT NULL,
    state      BIGINT  NOT NULL CHECK (state BETWEEN 0 AND 7),  -- vmcloud code, VmState::code
    since      BIGINT  NOT NULL,
    contact    BIGINT  NOT NULL,
    batch_id   BIGINT,
    node_id    BIGINT,
    domain     TEXT,
    ip         TEXT    NOT NULL DEFAULT '',
    public_ip  TEXT    NOT NULL DEFAULT '',
    vnc_port   BIGINT  NOT NULL DEFAULT 0,
    vnc_passwd TEXT    NOT NULL DEFAULT '',
    op         BIGINT  NOT NULL,
    PRIMARY KEY (pool, id),
    CHECK ((node_id IS NULL) = (domain IS NULL))  -- a placement is both or neither
);

CREATE TABLE batches (
    pool         TEXT    NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    id           BIGINT  NOT NULL,
    size         BIGINT  NOT NULL,
    profile_name TEXT    NOT NULL,
    home_page    TEXT    NOT NULL,
    vms          TEXT    NOT NULL DEFAULT '[]',  -- JSON array of vm ids, in batch order
    mark_delete  BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (pool, id)
);

CREATE TABLE handles (
    pool       TEXT    NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    id         BIGINT  NOT NULL,
    batch_id   BIGINT  NOT NULL,
    vm_id      BIGINT,
    expires_at BIGINT,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (pool, id)
);

CREATE TABLE nodes (
    id         BIGINT  PRIMARY KEY NOT NULL,
    name       TEXT    NOT NULL,
    driver     TEXT    NOT NULL,
    cores      BIGINT  NOT NULL,
    ram_mb     BIGINT  NOT NULL,
    disk_mb    BIGINT  NOT NULL,
    address    TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    created_at BIGINT  NOT NULL
);
