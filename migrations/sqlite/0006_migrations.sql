-- Migration between hypervisors (specs/migration.md): the endpoints VMs come from and go to,
-- what each source holds, and the migrations themselves.

CREATE TABLE migration_endpoints (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: migrations keep referring to it
    role       TEXT    NOT NULL,                   -- source|destination
    name       TEXT    NOT NULL,
    kind       TEXT    NOT NULL,                   -- the driver: libvirt|file|http|vmware|hyperv|virtualbox|hive
    params     TEXT    NOT NULL,                   -- JSON connection parameters, secrets included (needed to connect)
    state      TEXT    NOT NULL,                   -- Up|Down|Unknown, from the latest heartbeat
    last_seen  INTEGER,
    checked_by INTEGER,                            -- node id of the latest heartbeat
    UNIQUE (role, name)
);

CREATE TABLE migration_resources (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id    INTEGER NOT NULL REFERENCES migration_endpoints (id) ON DELETE CASCADE,
    id_at_source TEXT    NOT NULL,
    kind         TEXT    NOT NULL,                 -- instance|volume|network
    name         TEXT    NOT NULL,
    properties   TEXT    NOT NULL,                 -- JSON, as the source reported
    migrated     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (source_id, id_at_source)
);

-- No foreign keys to resources or endpoints: a finished migration's record outlives both.
CREATE TABLE vm_migrations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT    NOT NULL,
    description    TEXT    NOT NULL,
    resource_id    INTEGER NOT NULL,
    destination_id INTEGER NOT NULL,
    status         TEXT    NOT NULL,               -- Initiating|Inprogress|Completed|Error|Cancelled
    event          TEXT    NOT NULL,               -- scheduling|connecting|fetching|converting|uploading|booting|done
    progress       INTEGER NOT NULL,
    error          TEXT,
    worker         INTEGER,
    attempts       TEXT    NOT NULL,               -- JSON [{node, error, at}]
    result         TEXT,                           -- JSON, once Completed
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX vm_migrations_by_resource ON vm_migrations (resource_id);
