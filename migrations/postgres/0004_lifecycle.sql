-- Users (bearer tokens, stored only as SHA-256) and the image lifecycle's objects:
-- baseimages, environments, deployments and apps, each derived from its parent.
-- Postgres twin of migrations/sqlite/0004_lifecycle.sql.

CREATE TABLE users (
    name             TEXT    PRIMARY KEY NOT NULL,
    token_hash       TEXT    NOT NULL UNIQUE,     -- SHA-256 hex of the token; the token itself is never stored
    max_environments BIGINT  NOT NULL DEFAULT 1,
    created_at       BIGINT  NOT NULL
);

CREATE TABLE lifecycle_objects (
    id         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- a sequence: never reused, snapshot names carry it
    kind       TEXT    NOT NULL,                   -- baseimage|environment|deployment|app
    name       TEXT    NOT NULL,
    owner      TEXT    NOT NULL,                   -- a user's name, or 'admin'
    parent     BIGINT  REFERENCES lifecycle_objects (id),
    traits     TEXT    NOT NULL,                   -- JSON {"type","os","protocol"}
    phase      TEXT    NOT NULL,                   -- create|config_auto|config_interactive|finalize|ready|failed|deleting
    reason     TEXT,                               -- why it failed
    spec       TEXT    NOT NULL,                   -- JSON: what it was asked to be
    runtime    TEXT    NOT NULL,                   -- JSON: node, domain, snapshot, console, command runs
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);
CREATE INDEX lifecycle_by_parent ON lifecycle_objects (parent);
