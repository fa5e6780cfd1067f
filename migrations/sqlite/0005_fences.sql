-- One row per pool: the fencing epoch of its newest manager. A transaction that carries an
-- older epoch is refused, so a manager whose lease moved to another instance cannot write.
CREATE TABLE pool_fences (
    pool  TEXT    PRIMARY KEY NOT NULL,
    epoch INTEGER NOT NULL
);
