//! The SQLite store: one database file in WAL mode with `synchronous=FULL`, so a committed
//! transaction has been fsynced and survives a crash or power loss.
//!
//! `apply` runs every change of a call inside one `BEGIN IMMEDIATE` transaction (all or
//! nothing), as one multi-row statement per table when no row repeats (`sqlite_rows.rs`); foreign keys are on, so a row for an unknown pool fails the whole call. `load_pools`
//! reads inside one transaction, so it sees a single consistent snapshot. u64 values are stored
//! as INTEGER (i64, bit for bit). Schema: `migrations/sqlite/`, applied by `open`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};

use super::sqlite_rows::{self as rows, Plan, PoolRow};
use super::{Change, NodeRecord, Store, StoreError, StoredPool};
use crate::domain::pool::{Batch, Handle, PoolSize, PoolSnapshot};
use crate::domain::vm::{Placement, Vm, VmAddress, VmState};

const MAX_CONNECTIONS: u32 = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
}

impl SqliteStore {
    /// Open (creating the file if missing, but not its directory) and migrate.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        check_on_disk(url)?;
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let file = opts.get_filename().to_path_buf();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(StoreError::Unavailable(format!(
                    "cannot open sqlite database {}: directory {} does not exist",
                    file.display(),
                    dir.display()
                )));
            }
        }
        let pool =
            SqlitePoolOptions::new().max_connections(MAX_CONNECTIONS).connect_with(opts).await.map_err(|e| match StoreError::from(e) {
                StoreError::Unavailable(m) => StoreError::Unavailable(format!("cannot open sqlite database {}: {m}", file.display())),
                other => other,
            })?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        tracing::debug!(path = %file.display(), "sqlite store open");
        Ok(SqliteStore { pool })
    }

    /// Wait for every connection to close (checkpointing the WAL). Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// In-memory SQLite vanishes when the pool's last connection closes, and a temporary file
/// (empty name) is private to one connection: either would lose acknowledged writes.
fn check_on_disk(url: &str) -> Result<(), StoreError> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let (db, params) = rest.split_once('?').unwrap_or((rest, ""));
    if db.is_empty() || db == ":memory:" || params.split('&').any(|p| p == "mode=memory") {
        return Err(StoreError::BadUrl(format!("{url}: the store needs a database file, e.g. sqlite://hive.db")));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn load_pools(&self) -> Result<Vec<StoredPool>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut pools = BTreeMap::new();
        for row in sqlx::query("SELECT * FROM pools ORDER BY name").fetch_all(&mut *tx).await? {
            let name: String = row.try_get("name")?;
            pools.insert(name, pool_from_row(&row)?);
        }
        for row in sqlx::query("SELECT * FROM vms ORDER BY pool, id").fetch_all(&mut *tx).await? {
            if let Some(snap) = pools.get_mut(&row.try_get::<String, _>("pool")?) {
                snap.vms.push(vm_from_row(&row)?);
            }
        }
        for row in sqlx::query("SELECT * FROM batches ORDER BY pool, id").fetch_all(&mut *tx).await? {
            if let Some(snap) = pools.get_mut(&row.try_get::<String, _>("pool")?) {
                snap.batches.push(batch_from_row(&row)?);
            }
        }
        for row in sqlx::query("SELECT * FROM handles ORDER BY pool, id").fetch_all(&mut *tx).await? {
            if let Some(snap) = pools.get_mut(&row.try_get::<String, _>("pool")?) {
                snap.handles.push(handle_from_row(&row)?);
            }
        }
        tx.commit().await?;
        Ok(pools
            .into_iter()
            .map(|(name, mut snapshot)| {
                // Ids are u64 stored as i64; sort as u64 so ids past i64::MAX keep their order.
                snapshot.vms.sort_by_key(|v| v.id);
                snapshot.batches.sort_by_key(|b| b.id);
                snapshot.handles.sort_by_key(|h| h.id);
                StoredPool { name, snapshot }
            })
            .collect())
    }

    async fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM nodes ORDER BY id").fetch_all(&self.pool).await?;
        let mut nodes = rows.iter().map(node_from_row).collect::<Result<Vec<_>, _>>()?;
        nodes.sort_by_key(|n| n.id);
        Ok(nodes)
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        // IMMEDIATE takes the write lock up front (waiting up to busy_timeout) instead of
        // failing with SQLITE_BUSY when a read transaction has to be upgraded.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (pool, epoch) in super::fences(changes) {
            let checked = sqlx::query("UPDATE pool_fences SET epoch = epoch WHERE pool = ? AND epoch = ?")
                .bind(pool)
                .bind(int(epoch))
                .execute(&mut *tx)
                .await?;
            if checked.rows_affected() != 1 {
                return Err(StoreError::Superseded(pool.to_string()));
            }
        }
        match Plan::of(changes) {
            // Each row at most once: one statement per table.
            Some(plan) => plan.run(&mut tx).await?,
            // A row written twice or a pool deleted: order matters, one change at a time.
            None => {
                for change in changes {
                    apply_one(&mut tx, change).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn pool_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = sqlx::query_scalar("SELECT name FROM pools").fetch_all(&self.pool).await?;
        names.sort();
        Ok(names)
    }

    async fn take_fence(&self, pool: &str, floor: u64) -> Result<u64, StoreError> {
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO pool_fences (pool, epoch) VALUES (?, ?)
             ON CONFLICT(pool) DO UPDATE SET epoch = max(pool_fences.epoch + 1, excluded.epoch) RETURNING epoch",
        )
        .bind(pool)
        .bind(int(floor.max(1)))
        .fetch_one(&self.pool)
        .await?;
        Ok(epoch as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "sqlite"
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

pub(super) async fn apply_one(conn: &mut SqliteConnection, change: &Change) -> Result<(), StoreError> {
    let query = match change {
        Change::Pool { pool, size, next_vm, next_batch, next_handle, preps, pending } => {
            let row = PoolRow { pool, size: *size, counters: [*next_vm, *next_batch, *next_handle], preps, pending };
            return rows::upsert_pools(conn, &[row]).await;
        }
        Change::PoolDeleted { pool } => {
            // The schema cascades; deleting children explicitly keeps this correct even on a
            // connection opened without foreign keys.
            for table in ["vms", "batches", "handles"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE pool = ?")).bind(pool).execute(&mut *conn).await?;
            }
            sqlx::query("DELETE FROM pools WHERE name = ?").bind(pool)
        }
        Change::Vm { pool, vm } => return rows::upsert_vms(conn, &[(pool, vm)]).await,
        Change::VmDeleted { pool, id } => sqlx::query("DELETE FROM vms WHERE pool = ? AND id = ?").bind(pool).bind(int(*id)),
        Change::Batch { pool, batch } => return rows::upsert_batches(conn, &[(pool, batch)]).await,
        Change::BatchDeleted { pool, id } => sqlx::query("DELETE FROM batches WHERE pool = ? AND id = ?").bind(pool).bind(int(*id)),
        Change::Handle { pool, handle } => return rows::upsert_handles(conn, &[(pool, handle)]).await,
        Change::HandleDeleted { pool, id } => sqlx::query("DELETE FROM handles WHERE pool = ? AND id = ?").bind(pool).bind(int(*id)),
        Change::Node(n) => return rows::upsert_nodes(conn, &[n]).await,
        Change::NodeDeleted { id } => sqlx::query("DELETE FROM nodes WHERE id = ?").bind(int(*id)),
        Change::NodeAdmin { id, admin } => sqlx::query("UPDATE nodes SET admin = ? WHERE id = ?").bind(admin).bind(int(*id)),
        // Checked by `apply` before anything else.
        Change::Fence { .. } => return Ok(()),
        Change::Served(r) => {
            sqlx::query("INSERT INTO served (node_id, pool, handle, vm, cores, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .bind(int(r.node_id))
                .bind(r.pool.as_str())
                .bind(int(r.handle))
                .bind(int(r.vm))
                .bind(i64::from(r.cores))
                .bind(int(r.started_at))
                .bind(int(r.ended_at))
        }
    };
    query.execute(&mut *conn).await?;
    Ok(())
}

// ---- encoding ------------------------------------------------------------------------------

/// u64 → INTEGER, bit for bit; `uint` is the inverse.
pub(super) fn int(v: u64) -> i64 {
    v as i64
}

fn uint(v: i64) -> u64 {
    v as u64
}

pub(super) fn json<T: Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Query(format!("encoding json: {e}")))
}

fn get_u64(row: &SqliteRow, col: &str) -> Result<u64, StoreError> {
    Ok(uint(row.try_get::<i64, _>(col)?))
}

fn get_opt_u64(row: &SqliteRow, col: &str) -> Result<Option<u64>, StoreError> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(uint))
}

fn get_small<T: TryFrom<i64>>(row: &SqliteRow, col: &str) -> Result<T, StoreError> {
    let v: i64 = row.try_get(col)?;
    T::try_from(v).map_err(|_| StoreError::Query(format!("column {col}: {v} is out of range")))
}

fn get_json<T: DeserializeOwned>(row: &SqliteRow, col: &str) -> Result<T, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Query(format!("column {col}: bad json: {e}")))
}

fn pool_from_row(row: &SqliteRow) -> Result<PoolSnapshot, StoreError> {
    Ok(PoolSnapshot {
        size: PoolSize { min: get_small(row, "min")?, max: get_small(row, "max")?, linger: get_u64(row, "linger")? },
        next_vm: get_u64(row, "next_vm")?,
        next_batch: get_u64(row, "next_batch")?,
        next_handle: get_u64(row, "next_handle")?,
        preps: get_json(row, "preps")?,
        pending: get_json(row, "pending")?,
        vms: Vec::new(),
        batches: Vec::new(),
        handles: Vec::new(),
    })
}

fn vm_from_row(row: &SqliteRow) -> Result<Vm, StoreError> {
    let code: u8 = get_small(row, "state")?;
    let state = VmState::from_code(code).ok_or_else(|| StoreError::Query(format!("unknown vm state {code}")))?;
    let node = get_opt_u64(row, "node_id")?;
    let domain: Option<String> = row.try_get("domain")?;
    Ok(Vm {
        id: get_u64(row, "id")?,
        state,
        since: get_u64(row, "since")?,
        contact: get_u64(row, "contact")?,
        batch: get_opt_u64(row, "batch_id")?,
        placement: node.zip(domain).map(|(node, domain)| Placement { node, domain }),
        address: VmAddress {
            ip: row.try_get("ip")?,
            public_ip: row.try_get("public_ip")?,
            vnc_port: get_small(row, "vnc_port")?,
            vnc_passwd: row.try_get("vnc_passwd")?,
        },
        op: get_u64(row, "op")?,
    })
}

fn batch_from_row(row: &SqliteRow) -> Result<Batch, StoreError> {
    Ok(Batch {
        id: get_u64(row, "id")?,
        size: get_small(row, "size")?,
        profile_name: row.try_get("profile_name")?,
        home_page: row.try_get("home_page")?,
        vms: get_json(row, "vms")?,
        mark_delete: row.try_get("mark_delete")?,
    })
}

fn handle_from_row(row: &SqliteRow) -> Result<Handle, StoreError> {
    Ok(Handle {
        id: get_u64(row, "id")?,
        batch: get_u64(row, "batch_id")?,
        vm: get_opt_u64(row, "vm_id")?,
        expires_at: get_opt_u64(row, "expires_at")?,
        created_at: get_u64(row, "created_at")?,
    })
}

fn node_from_row(row: &SqliteRow) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: get_u64(row, "id")?,
        name: row.try_get("name")?,
        driver: row.try_get("driver")?,
        cores: get_small(row, "cores")?,
        ram_mb: get_u64(row, "ram_mb")?,
        disk_mb: get_u64(row, "disk_mb")?,
        address: row.try_get("address")?,
        state: row.try_get("state")?,
        created_at: get_u64(row, "created_at")?,
        remote: row.try_get("remote")?,
        class: row.try_get("class")?,
        admin: row.try_get("admin")?,
        credential_hash: row.try_get("credential_hash")?,
    })
}
