-- Images (content-addressed by SHA-256) and the resumable uploads that create them.
-- Postgres twin of migrations/sqlite/0003_images.sql: an image row exists only once its blob is
-- complete, verified and in place; an upload row says how many bytes of its staging file are
-- known to be on disk.

CREATE TABLE images (
    sha256     TEXT    PRIMARY KEY NOT NULL,  -- 64 lowercase hex digits
    name       TEXT    NOT NULL,
    readme     TEXT    NOT NULL DEFAULT '',
    cores      BIGINT  NOT NULL,
    ram_mb     BIGINT  NOT NULL,
    disk_mb    BIGINT  NOT NULL,
    size       BIGINT  NOT NULL,
    piece_size BIGINT  NOT NULL,
    pieces     TEXT    NOT NULL,              -- JSON array of each piece's SHA-256, piece order
    created_at BIGINT  NOT NULL
);

CREATE TABLE uploads (
    id           TEXT    PRIMARY KEY NOT NULL,
    sha256       TEXT    NOT NULL UNIQUE,     -- one upload per content: posting it again resumes
    name         TEXT    NOT NULL,
    readme       TEXT    NOT NULL DEFAULT '',
    requirements TEXT    NOT NULL,            -- JSON {"cores":…,"ram_mb":…,"disk_mb":…}
    size         BIGINT  NOT NULL,
    received     BIGINT  NOT NULL DEFAULT 0,  -- bytes fsynced to the staging file
    created_at   BIGINT  NOT NULL
);
