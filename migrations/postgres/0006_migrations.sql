-- Migration between hypervisors (specs/migration.md): the endpoints VMs come from and go to,
-- what each source holds, and the migrations themselves.
-- Postgres twin of migrations/sqlite/0006_migrations.sql.

CREATE TABLE migration_endpoints (
    id         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused: migrations keep referring to it
    role       TEXT    NOT NULL,                   -- source|destination
    name       TEXT    NOT NULL,
    kind       TEXT    NOT NULL,                   -- the driver: libvirt|file|http|vmware|hyperv|virtualbox|hive
    params     TEXT    NOT NULL,                   -- JSON connection parameters, secrets included (needed to connect)
    state      TEXT    NOT NULL,                   -- Up|Down|Unknown, from the latest heartbeat
    last_seen  BIGINT,
    checked_by BIGINT,                             -- node id of the latest heartbeat
    UNIQUE (role, name)
);

CREATE TABLE migration_resources (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id    BIGINT  NOT NULL REFERENCES migration_endpoints (id) ON DELETE CASCADE,
    id_at_source TEXT    NOT NULL,
    kind         TEXT    NOT NULL,                 -- instance|volume|network
    name         TEXT    NOT NULL,
    properties   TEXT    NOT NULL,                 -- JSON, as the source reported
    migrated     BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (source_id, id_at_source)
);

-- No foreign keys to resources or endpoints: a finished migration's record outlives both.
CREATE TABLE vm_migrations (
    id             BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           TEXT    NOT NULL,
    description    TEXT    NOT NULL,
    resource_id    BIGINT  NOT NULL,
    destination_id BIGINT  NOT NULL,
    status         TEXT    NOT NULL,               -- Initiating|Inprogress|Completed|Error|Cancelled
    event          TEXT    NOT NULL,               -- scheduling|connecting|fetching|converting|uploading|booting|done
    progress       BIGINT  NOT NULL,
    error          TEXT,
    worker         BIGINT,
    attempts       TEXT    NOT NULL,               -- JSON [{node, error, at}]
    result         TEXT,                           -- JSON, once Completed
    created_at     BIGINT  NOT NULL,
    updated_at     BIGINT  NOT NULL
);
CREATE INDEX vm_migrations_by_resource ON vm_migrations (resource_id);
