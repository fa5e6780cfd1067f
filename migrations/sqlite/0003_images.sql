-- Images (content-addressed by SHA-256) and the resumable uploads that create them.
-- An image row exists only once its blob is complete, verified and in place under
-- data_dir/images/blobs/<sha256>; an upload row says how many bytes of its staging file
-- data_dir/images/uploads/<id>.part are known to be on disk.

CREATE TABLE images (
    sha256     TEXT    PRIMARY KEY NOT NULL,  -- 64 lowercase hex digits
    name       TEXT    NOT NULL,
    readme     TEXT    NOT NULL DEFAULT '',
    cores      INTEGER NOT NULL,
    ram_mb     INTEGER NOT NULL,
    disk_mb    INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    piece_size INTEGER NOT NULL,
    pieces     TEXT    NOT NULL,              -- JSON array of each piece's SHA-256, piece order
    created_at INTEGER NOT NULL
);

CREATE TABLE uploads (
    id           TEXT    PRIMARY KEY NOT NULL,
    sha256       TEXT    NOT NULL UNIQUE,     -- one upload per content: posting it again resumes
    name         TEXT    NOT NULL,
    readme       TEXT    NOT NULL DEFAULT '',
    requirements TEXT    NOT NULL,            -- JSON {"cores":…,"ram_mb":…,"disk_mb":…}
    size         INTEGER NOT NULL,
    received     INTEGER NOT NULL DEFAULT 0,  -- bytes fsynced to the staging file
    created_at   INTEGER NOT NULL
);
