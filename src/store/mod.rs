//! Durable state: the `Store` trait, the rows it holds and `open`, which picks the
//! implementation by URL scheme (`sqlite://…`, or `postgres://…` for several hive instances).
//!
//! Writes are expressed as `Change`s, row-level upserts and deletes; a slice of them is applied in
//! one transaction, in order, all or nothing. `StoreWriter` (writer.rs) batches many callers'
//! changes into one transaction so that durability before answering costs one commit per group,
//! not one per request. All SQL of the crate lives under this module.

pub mod images;
pub mod lifecycle;
pub mod migrations;
pub mod nodes;
pub mod postgres;
mod postgres_migrations;
mod postgres_rows;
mod postgres_subs;
pub mod sqlite;
mod sqlite_rows;
pub mod writer;

#[cfg(test)]
pub(crate) mod test_stores;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::pool::{Batch, Handle, PendingLock, PoolSize, PoolSnapshot};
use crate::domain::vm::Vm;

pub use images::ImageStore;
pub use lifecycle::{LifecycleStore, UserRecord};
pub use migrations::{EndpointUpdate, MigrationStore};
pub use nodes::{NodeStore, Rating};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use writer::StoreWriter;

/// Errors carry strings only, so one failed group commit can be reported to every caller in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("store: {0}")]
    Query(String),
    #[error("bad database url: {0}")]
    BadUrl(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error("store writer has stopped")]
    WriterGone,
    #[error("not written: an earlier change it depends on failed")]
    Fenced,
    /// A newer manager of the pool took its fence (the lease moved): this one may not write.
    #[error("pool {0:?} is now run by a newer manager (its lease moved); not written")]
    Superseded(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            E::Database(db) if is_unavailable(db.as_ref()) => StoreError::Unavailable(e.to_string()),
            E::Configuration(_) => StoreError::BadUrl(e.to_string()),
            E::Migrate(m) => StoreError::Migrate(m.to_string()),
            _ => StoreError::Query(e.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e.to_string())
    }
}

/// The error says the server cannot serve now (as opposed to "this statement is wrong"). Postgres
/// reports a SQLSTATE, SQLite a numeric result code.
fn is_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else { return false };
    if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
        is_unavailable_sqlstate(&code)
    } else {
        is_unavailable_code(&code)
    }
}

/// Postgres SQLSTATEs of that kind: class 08 (connection exception), 53 (insufficient resources:
/// disk full, out of memory, too many connections) and 57P01-57P03 (admin/crash shutdown, cannot
/// connect now).
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// SQLite result codes (primary part of the extended code) that mean "the database cannot be
/// reached or written right now" rather than "this statement is wrong": BUSY, LOCKED, IOERR,
/// FULL, CANTOPEN.
fn is_unavailable_code(code: &str) -> bool {
    code.parse::<i64>().is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPool {
    pub name: String,
    pub snapshot: PoolSnapshot,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub name: String,
    pub driver: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub address: String,
    pub state: String,
    pub created_at: u64,
    /// Runs `hive node` (joined over the network) rather than in-process.
    pub remote: bool,
    /// `participant` or `cloud` (elastic capacity used when no participant fits).
    pub class: String,
    /// `active`, `cordoned` or `draining`.
    pub admin: String,
    /// SHA-256 hex of the node's credential; the credential itself is never stored.
    pub credential_hash: Option<String>,
}

/// One ended user session on a node: the rewards ledger's unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRecord {
    pub node_id: u64,
    pub pool: String,
    pub handle: u64,
    pub vm: u64,
    pub cores: u32,
    pub started_at: u64,
    pub ended_at: u64,
}

/// One row-level change. A `Vec<Change>` is applied in ONE transaction, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Upsert the pool row: size, id counters, preparation queue and pending locks.
    Pool {
        pool: String,
        size: PoolSize,
        next_vm: u64,
        next_batch: u64,
        next_handle: u64,
        preps: Vec<u64>,
        pending: Vec<PendingLock>,
    },
    /// Delete the pool and every vm/batch/handle row of it.
    PoolDeleted {
        pool: String,
    },
    Vm {
        pool: String,
        vm: Vm,
    },
    VmDeleted {
        pool: String,
        id: u64,
    },
    Batch {
        pool: String,
        batch: Batch,
    },
    BatchDeleted {
        pool: String,
        id: u64,
    },
    Handle {
        pool: String,
        handle: Handle,
    },
    HandleDeleted {
        pool: String,
        id: u64,
    },
    /// Upsert a node's row. An existing row keeps its `admin` state: that is written only by
    /// `NodeAdmin`, so a node-state write by one instance cannot undo a cordon made through
    /// another (the record's `admin` is used when the row is first inserted).
    Node(NodeRecord),
    NodeDeleted {
        id: u64,
    },
    /// An admin's cordon, drain or activate of an existing node.
    NodeAdmin {
        id: u64,
        admin: String,
    },
    /// Append a row to the rewards ledger.
    Served(ServedRecord),
    /// The whole transaction is void unless `pool`'s fencing epoch is still `epoch` (taken with
    /// `Store::take_fence`): a manager whose lease moved on cannot write after its successor
    /// loaded the pool. Checked before any other row, under the fence row's lock.
    Fence {
        pool: String,
        epoch: u64,
    },
}

impl Change {
    /// Every change that writes `snap` in full as pool `pool` (rows not in `snap` are left alone).
    pub fn snapshot(pool: &str, snap: &PoolSnapshot) -> Vec<Change> {
        let mut out = Vec::with_capacity(1 + snap.vms.len() + snap.batches.len() + snap.handles.len());
        out.push(Change::Pool {
            pool: pool.to_string(),
            size: snap.size,
            next_vm: snap.next_vm,
            next_batch: snap.next_batch,
            next_handle: snap.next_handle,
            preps: snap.preps.clone(),
            pending: snap.pending.clone(),
        });
        let p = || pool.to_string();
        out.extend(snap.vms.iter().map(|vm| Change::Vm { pool: p(), vm: vm.clone() }));
        out.extend(snap.batches.iter().map(|b| Change::Batch { pool: p(), batch: b.clone() }));
        out.extend(snap.handles.iter().map(|h| Change::Handle { pool: p(), handle: h.clone() }));
        out
    }
}

/// The fences among `changes`, deduplicated, in the order they appear.
pub(crate) fn fences(changes: &[Change]) -> Vec<(&str, u64)> {
    let mut out: Vec<(&str, u64)> = Vec::new();
    for c in changes {
        if let Change::Fence { pool, epoch } = c {
            if !out.contains(&(pool.as_str(), *epoch)) {
                out.push((pool.as_str(), *epoch));
            }
        }
    }
    out
}

/// Which row a change writes: (table, pool, id). `None` for a pool deletion, which touches
/// many rows and must keep its place among the changes around it.
pub type RowKey<'a> = (u8, &'a str, u64);

impl Change {
    pub fn row(&self) -> Option<RowKey<'_>> {
        Some(match self {
            Change::Pool { pool, .. } => (0, pool.as_str(), 0),
            Change::PoolDeleted { .. } => return None,
            Change::Vm { pool, vm } => (1, pool.as_str(), vm.id),
            Change::VmDeleted { pool, id } => (1, pool.as_str(), *id),
            Change::Batch { pool, batch } => (2, pool.as_str(), batch.id),
            Change::BatchDeleted { pool, id } => (2, pool.as_str(), *id),
            Change::Handle { pool, handle } => (3, pool.as_str(), handle.id),
            Change::HandleDeleted { pool, id } => (3, pool.as_str(), *id),
            Change::Node(n) => (4, "", n.id),
            Change::NodeDeleted { id } => (4, "", *id),
            // Its own row key: it must not be merged away by a later upsert of the same node.
            Change::NodeAdmin { id, .. } => (7, "", *id),
            Change::Served(r) => (5, r.pool.as_str(), r.handle),
            Change::Fence { pool, epoch } => (6, pool.as_str(), *epoch),
        })
    }
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every pool with all its rows, pools ordered by name, rows by id; preps/pending in stored order.
    async fn load_pools(&self) -> Result<Vec<StoredPool>, StoreError>;
    async fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// The pools' names, sorted: a cheap look for pools made or deleted by other instances.
    async fn pool_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.load_pools().await?.into_iter().map(|p| p.name).collect())
    }
    /// Apply all changes in one transaction (all or nothing).
    async fn apply(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Become `pool`'s newest writer: its fencing epoch becomes the larger of `floor` (the
    /// lease's token) and the previous epoch + 1, and is answered. From then on, a transaction
    /// carrying `Change::Fence` with an older epoch is refused as `Superseded`. Rising past the
    /// stored value even when the lease counter was reset (a Redis without persistence) keeps
    /// the fence meaningful.
    async fn take_fence(&self, pool: &str, floor: u64) -> Result<u64, StoreError>;
    /// A cheap round trip, for /readyz.
    async fn ping(&self) -> Result<(), StoreError>;
    fn kind(&self) -> &'static str;
    /// Image and upload rows (`images.rs`), where this implementation holds them.
    fn images(&self) -> Option<&dyn ImageStore> {
        None
    }
    /// Join tokens, the rewards ledger and ratings (`nodes.rs`), where this implementation holds them.
    fn node_rows(&self) -> Option<&dyn NodeStore> {
        None
    }
    /// Users and lifecycle objects (`lifecycle.rs`), where this implementation holds them.
    fn lifecycle(&self) -> Option<&dyn LifecycleStore> {
        None
    }
    /// Migration endpoints, resources and migrations (`migrations.rs`), where this implementation holds them.
    fn migrations(&self) -> Option<&dyn MigrationStore> {
        None
    }
}

/// Choose the implementation by URL scheme: `sqlite://path/to/file.db` (created if missing) or
/// `postgres://user@host:port/database` (`postgresql://` too; the database must exist).
/// Runs migrations. Any other scheme is `StoreError::BadUrl` naming the scheme.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let Some((scheme, _)) = url.split_once(':') else {
        return Err(StoreError::BadUrl(format!("`{url}` has no scheme; expected sqlite://path/to/file.db or postgres://host/db")));
    };
    match scheme {
        "sqlite" => Ok(Arc::new(SqliteStore::open(url).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(PostgresStore::open(url).await?)),
        other => Err(StoreError::BadUrl(format!("unsupported scheme `{other}`; use sqlite:// or postgres://"))),
    }
}
