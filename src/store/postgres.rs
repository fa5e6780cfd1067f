//! The Postgres store, for several hive instances on one database. Same rows and semantics as
//! the SQLite store (sqlite.rs): u64 values as BIGINT bit for bit, whole lists as JSON text.
//!
//! `apply` runs every change of a call in one transaction (all or nothing, durable at commit
//! with Postgres's default `synchronous_commit=on`), as one multi-row statement per table when no
//! row repeats (the same `Plan` as SQLite, rows sorted by key so concurrent writers lock rows in
//! one order); a deadlock or serialization failure retries the whole transaction. `load_pools`
//! reads in one REPEATABLE READ transaction, so it sees a single snapshot. Schema:
//! `migrations/postgres/`, applied by `open` (sqlx takes an advisory lock, so instances starting
//! together migrate once).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::postgres_rows::{self as rows, batch_from_row, handle_from_row, node_from_row, pool_from_row, vm_from_row};
use super::sqlite_rows::Plan;
use super::{Change, NodeRecord, Store, StoreError, StoredPool};

const MAX_CONNECTIONS: u32 = 8;
/// A caller waits at most this long for a connection, so an unreachable server turns into
/// `Unavailable` (HTTP 503) quickly instead of hanging requests.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts of one `apply` when Postgres aborts it for a deadlock or serialization failure.
const ATTEMPTS: usize = 3;

pub struct PostgresStore {
    pub(super) pool: PgPool,
}

impl PostgresStore {
    /// Connect (`postgres://user@host:port/db`) and migrate. The database must exist.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::BadUrl(format!("{}: {e}", redact(url))))?;
        let target = format!("{}:{}/{}", opts.get_host(), opts.get_port(), opts.get_database().unwrap_or(""));
        let pool =
            PgPoolOptions::new().max_connections(MAX_CONNECTIONS).acquire_timeout(ACQUIRE_TIMEOUT).connect_with(opts).await.map_err(
                |e| match StoreError::from(e) {
                    StoreError::Unavailable(m) => StoreError::Unavailable(format!("cannot reach postgres at {target}: {m}")),
                    StoreError::Query(m) => StoreError::Query(format!("postgres at {target}: {m}")),
                    other => other,
                },
            )?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        tracing::debug!(server = %target, "postgres store open");
        Ok(PostgresStore { pool })
    }

    /// Close every connection. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// `Ok(Err(pool))` when a fence refused the transaction (nothing written).
    async fn apply_once(&self, changes: &[Change]) -> Result<Result<(), String>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for (pool, epoch) in super::fences(changes) {
            // The row lock also waits out a successor's take_fence in flight.
            let checked = sqlx::query("UPDATE pool_fences SET epoch = epoch WHERE pool = $1 AND epoch = $2")
                .bind(pool)
                .bind(rows::int(epoch))
                .execute(&mut *tx)
                .await?;
            if checked.rows_affected() != 1 {
                return Ok(Err(pool.to_string()));
            }
        }
        match Plan::of(changes) {
            Some(mut plan) => {
                sort_plan(&mut plan);
                rows::run_plan(&mut tx, &plan).await?;
            }
            None => {
                for change in changes {
                    rows::apply_one(&mut tx, change).await?;
                }
            }
        }
        tx.commit().await.map(Ok)
    }
}

/// Row locks are taken in statement order; one order for every writer means two instances
/// writing overlapping rows wait for each other instead of deadlocking.
fn sort_plan(plan: &mut Plan<'_>) {
    plan.pools.sort_by(|a, b| a.pool.cmp(b.pool));
    plan.vms.sort_by_key(|(p, v)| (*p, v.id));
    plan.batches.sort_by_key(|(p, b)| (*p, b.id));
    plan.handles.sort_by_key(|(p, h)| (*p, h.id));
    plan.nodes.sort_by_key(|n| n.id);
}

/// Postgres aborted the transaction but a retry can succeed: serialization failure, deadlock.
fn retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "40001" || c == "40P01"))
}

/// The URL without its password, for error messages and logs.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            let creds = &rest[..at - scheme.len() - 3];
            let user = creds.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{}", &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn load_pools(&self) -> Result<Vec<StoredPool>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let mut pools = BTreeMap::new();
        for row in sqlx::query("SELECT * FROM pools").fetch_all(&mut *tx).await? {
            let name: String = sqlx::Row::try_get(&row, "name")?;
            pools.insert(name, pool_from_row(&row)?);
        }
        for row in sqlx::query("SELECT * FROM vms").fetch_all(&mut *tx).await? {
            if let Some(snap) = pools.get_mut(&sqlx::Row::try_get::<String, _>(&row, "pool")?) {
                snap.vms.push(vm_from_row(&row)?);
            }
        }
        for row in sqlx::query("SELECT * FROM batches").fetch_all(&mut *tx).await? {
            if let Some(snap) = pools.get_mut(&sqlx::Row::try_get::<String, _>(&row, "pool")?) {
                snap.batches.push(batch_from_row(&row)?);
            }
        }
        for row in sqlx::query("SELECT * FROM handles").fetch_all(&mut *tx).await? {
            if let Some(snap) = pools.get_mut(&sqlx::Row::try_get::<String, _>(&row, "pool")?) {
                snap.handles.push(handle_from_row(&row)?);
            }
        }
        tx.commit().await?;
        // Sorted here, not in SQL: names by bytes whatever the database collation, ids as u64.
        Ok(pools
            .into_iter()
            .map(|(name, mut snapshot)| {
                snapshot.vms.sort_by_key(|v| v.id);
                snapshot.batches.sort_by_key(|b| b.id);
                snapshot.handles.sort_by_key(|h| h.id);
                StoredPool { name, snapshot }
            })
            .collect())
    }

    async fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM nodes").fetch_all(&self.pool).await?;
        let mut nodes = rows.iter().map(node_from_row).collect::<Result<Vec<_>, _>>()?;
        nodes.sort_by_key(|n| n.id);
        Ok(nodes)
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut attempt = 1;
        loop {
            match self.apply_once(changes).await {
                Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "postgres aborted a commit; retrying");
                    attempt += 1;
                }
                Ok(Err(pool)) => return Err(StoreError::Superseded(pool)),
                result => return Ok(result.map(|_| ())?),
            }
        }
    }

    async fn pool_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = sqlx::query_scalar("SELECT name FROM pools").fetch_all(&self.pool).await?;
        names.sort();
        Ok(names)
    }

    async fn take_fence(&self, pool: &str, floor: u64) -> Result<u64, StoreError> {
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO pool_fences (pool, epoch) VALUES ($1, $2)
             ON CONFLICT (pool) DO UPDATE SET epoch = GREATEST(pool_fences.epoch + 1, excluded.epoch) RETURNING epoch",
        )
        .bind(pool)
        .bind(rows::int(floor.max(1)))
        .fetch_one(&self.pool)
        .await?;
        Ok(epoch as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn images(&self) -> Option<&dyn super::ImageStore> {
        Some(self)
    }

    fn node_rows(&self) -> Option<&dyn super::NodeStore> {
        Some(self)
    }

    fn lifecycle(&self) -> Option<&dyn super::LifecycleStore> {
        Some(self)
    }

    fn migrations(&self) -> Option<&dyn super::MigrationStore> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://hive:s3cret@db:5432/hive"), "postgres://hive@db:5432/hive");
        assert_eq!(redact("postgres://hive@db/hive"), "postgres://hive@db/hive");
        assert_eq!(redact("postgresql://db/hive"), "postgresql://db/hive");
    }
}
