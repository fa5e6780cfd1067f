-- Pools, their VMs, batches and handles, and the nodes that run them.
-- u64 values are stored as INTEGER (i64, bit for bit). Lists that are only ever read and
-- written whole (preparation queue, pending locks, a batch's VMs) are JSON arrays in TEXT.

CREATE TABLE pools (
    name        TEXT    PRIMARY KEY NOT NULL,
    min         INTEGER NOT NULL,
    max         INTEGER NOT NULL,
    linger      INTEGER NOT NULL,
    next_vm     INTEGER NOT NULL,
    next_batch  INTEGER NOT NULL,
    next_handle INTEGER NOT NULL,
    preps       TEXT    NOT NULL DEFAULT '[]',  -- JSON array of batch ids, queue order
    pending     TEXT    NOT NULL DEFAULT '[]'   -- JSON array of {"batch":…,"handle":…}, queue order
);

CREATE TABLE vms (
    pool       TEXT    NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    id         INTEGER NOT NULL,
    state      INTEGER NOT NULL CHECK (state BETWEEN 0 AND 7),  -- vmcloud code, VmState::code
    since      INTEGER NOT NULL,
    contact    INTEGER NOT NULL,
    batch_id   INTEGER,
    node_id    INTEGER,
    domain     TEXT,
    ip         TEXT    NOT NULL DEFAULT '',
    public_ip  TEXT    NOT NULL DEFAULT '',
    vnc_port   INTEGER NOT NULL DEFAULT 0,
    vnc_passwd TEXT    NOT NULL DEFAULT '',
    op         INTEGER NOT NULL,
    PRIMARY KEY (pool, id),
    CHECK ((node_id IS NULL) = (domain IS NULL))  -- a placement is both or neither
);

CREATE TABLE batches (
    pool         TEXT    NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    id           INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    profile_name TEXT    NOT NULL,
    home_page    TEXT    NOT NULL,
    vms          TEXT    NOT NULL DEFAULT '[]',  -- JSON array of vm ids, in batch order
    mark_delete  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pool, id)
);

CREATE TABLE handles (
    pool       TEXT    NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
    id         INTEGER NOT NULL,
    batch_id   INTEGER NOT NULL,
    vm_id      INTEGER,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (pool, id)
);

CREATE TABLE nodes (
    id         INTEGER PRIMARY KEY NOT NULL,
    name       TEXT    NOT NULL,
    driver     TEXT    NOT NULL,
    cores      INTEGER NOT NULL,
    ram_mb     INTEGER NOT NULL,
    disk_mb    INTEGER NOT NULL,
    address    TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
