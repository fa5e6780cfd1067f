//! Row writes of the SQLite store, one multi-row statement per table: a group commit that
//! writes each row at most once becomes about one statement per table instead of one per row
//! (each statement is a round trip to sqlx's SQLite worker thread, the largest cost of a
//! commit after fsync; see BENCHMARKS.md). Single rows go through the same statements.

use std::collections::HashSet;

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::sqlite::{int, json};
use super::{Change, NodeRecord, StoreError};
use crate::domain::pool::{Batch, Handle, PendingLock, PoolSize};
use crate::domain::vm::Vm;

/// Rows per statement: 13 columns × 500 stays far below SQLite's 32,766 variables.
const CHUNK: usize = 500;

pub(super) struct PoolRow<'a> {
    pub pool: &'a str,
    pub size: PoolSize,
    pub counters: [u64; 3],
    pub preps: &'a [u64],
    pub pending: &'a [PendingLock],
}

/// A group sorted by table; `None` if some row is written twice or a pool is deleted, since
/// then the order of the changes matters and they are applied one by one.
#[derive(Default)]
pub(super) struct Plan<'a> {
    // Visible to the store module: the Postgres store runs the same plan with its own statements.
    pub(super) pools: Vec<PoolRow<'a>>,
    pub(super) vms: Vec<(&'a str, &'a Vm)>,
    pub(super) batches: Vec<(&'a str, &'a Batch)>,
    pub(super) handles: Vec<(&'a str, &'a Handle)>,
    pub(super) nodes: Vec<&'a NodeRecord>,
    pub(super) deletes: Vec<&'a Change>,
    /// Single-row updates of rows the upserts may have just inserted (a node's admin state).
    pub(super) updates: Vec<&'a Change>,
}

impl<'a> Plan<'a> {
    pub(super) fn of(changes: &'a [Change]) -> Option<Plan<'a>> {
        let mut plan = Plan::default();
        let mut rows = HashSet::with_capacity(changes.len());
        for c in changes {
            if !rows.insert(c.row()?) {
                return None;
            }
            match c {
                Change::Pool { pool, size, next_vm, next_batch, next_handle, preps, pending } => {
                    plan.pools.push(PoolRow { pool, size: *size, counters: [*next_vm, *next_batch, *next_handle], preps, pending })
                }
                Change::Vm { pool, vm } => plan.vms.push((pool, vm)),
                Change::Batch { pool, batch } => plan.batches.push((pool, batch)),
                Change::Handle { pool, handle } => plan.handles.push((pool, handle)),
                Change::Node(n) => plan.nodes.push(n),
                Change::NodeAdmin { .. } => plan.updates.push(c),
                Change::PoolDeleted { .. } => unreachable!("row() is None for it"),
                // Checked by the store's `apply` before the plan runs.
                Change::Fence { .. } => {}
                Change::VmDeleted { .. }
                | Change::BatchDeleted { .. }
                | Change::HandleDeleted { .. }
                | Change::NodeDeleted { .. }
                | Change::Served(_) => plan.deletes.push(c),
            }
        }
        Some(plan)
    }

    /// Pools first (the other rows refer to them), then deletes, then the other upserts, then
    /// the updates of rows an upsert may have inserted.
    pub(super) async fn run(&self, conn: &mut SqliteConnection) -> Result<(), StoreError> {
        upsert_pools(conn, &self.pools).await?;
        for d in &self.deletes {
            super::sqlite::apply_one(conn, d).await?;
        }
        upsert_vms(conn, &self.vms).await?;
        upsert_batches(conn, &self.batches).await?;
        upsert_handles(conn, &self.handles).await?;
        upsert_nodes(conn, &self.nodes).await?;
        for u in &self.updates {
            super::sqlite::apply_one(conn, u).await?;
        }
        Ok(())
    }
}

async fn run(mut qb: QueryBuilder<'_, Sqlite>, conn: &mut SqliteConnection) -> Result<(), StoreError> {
    qb.build().execute(&mut *conn).await?;
    Ok(())
}

pub(super) async fn upsert_pools(conn: &mut SqliteConnection, rows: &[PoolRow<'_>]) -> Result<(), StoreError> {
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::new("INSERT INTO pools (name, min, max, linger, next_vm, next_batch, next_handle, preps, pending) ");
        let mut encoded = Vec::with_capacity(chunk.len());
        for r in chunk {
            encoded.push((json(r.preps)?, json(r.pending)?));
        }
        qb.push_values(chunk.iter().zip(encoded), |mut b, (r, (preps, pending))| {
            b.push_bind(r.pool)
                .push_bind(i64::from(r.size.min))
                .push_bind(i64::from(r.size.max))
                .push_bind(int(r.size.linger))
                .push_bind(int(r.counters[0]))
                .push_bind(int(r.counters[1]))
                .push_bind(int(r.counters[2]))
                .push_bind(preps)
                .push_bind(pending);
        });
        qb.push(
            " ON CONFLICT(name) DO UPDATE SET min = excluded.min, max = excluded.max, linger = excluded.linger,
              next_vm = excluded.next_vm, next_batch = excluded.next_batch, next_handle = excluded.next_handle,
              preps = excluded.preps, pending = excluded.pending",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

pub(super) async fn upsert_vms(conn: &mut SqliteConnection, rows: &[(&str, &Vm)]) -> Result<(), StoreError> {
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::new(
            "INSERT INTO vms (pool, id, state, since, contact, batch_id, node_id, domain, ip, public_ip, vnc_port, vnc_passwd, op) ",
        );
        qb.push_values(chunk, |mut b, (pool, vm)| {
            b.push_bind(*pool)
                .push_bind(int(vm.id))
                .push_bind(i64::from(vm.state.code()))
                .push_bind(int(vm.since))
                .push_bind(int(vm.contact))
                .push_bind(vm.batch.map(int))
                .push_bind(vm.placement.as_ref().map(|p| int(p.node)))
                .push_bind(vm.placement.as_ref().map(|p| p.domain.as_str()))
                .push_bind(vm.address.ip.as_str())
                .push_bind(vm.address.public_ip.as_str())
                .push_bind(i64::from(vm.address.vnc_port))
                .push_bind(vm.address.vnc_passwd.as_str())
                .push_bind(int(vm.op));
        });
        qb.push(
            " ON CONFLICT(pool, id) DO UPDATE SET state = excluded.state, since = excluded.since,
              contact = excluded.contact, batch_id = excluded.batch_id, node_id = excluded.node_id,
              domain = excluded.domain, ip = excluded.ip, public_ip = excluded.public_ip,
              vnc_port = excluded.vnc_port, vnc_passwd = excluded.vnc_passwd, op = excluded.op",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

pub(super) async fn upsert_batches(conn: &mut SqliteConnection, rows: &[(&str, &Batch)]) -> Result<(), StoreError> {
    for chunk in rows.chunks(CHUNK) {
        let mut encoded = Vec::with_capacity(chunk.len());
        for (_, b) in chunk {
            encoded.push(json(&b.vms)?);
        }
        let mut qb = QueryBuilder::new("INSERT INTO batches (pool, id, size, profile_name, home_page, vms, mark_delete) ");
        qb.push_values(chunk.iter().zip(encoded), |mut b, ((pool, batch), vms)| {
            b.push_bind(*pool)
                .push_bind(int(batch.id))
                .push_bind(i64::from(batch.size))
                .push_bind(batch.profile_name.as_str())
                .push_bind(batch.home_page.as_str())
                .push_bind(vms)
                .push_bind(batch.mark_delete);
        });
        qb.push(
            " ON CONFLICT(pool, id) DO UPDATE SET size = excluded.size, profile_name = excluded.profile_name,
              home_page = excluded.home_page, vms = excluded.vms, mark_delete = excluded.mark_delete",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

pub(super) async fn upsert_handles(conn: &mut SqliteConnection, rows: &[(&str, &Handle)]) -> Result<(), StoreError> {
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::new("INSERT INTO handles (pool, id, batch_id, vm_id, expires_at, created_at) ");
        qb.push_values(chunk, |mut b, (pool, h)| {
            b.push_bind(*pool)
                .push_bind(int(h.id))
                .push_bind(int(h.batch))
                .push_bind(h.vm.map(int))
                .push_bind(h.expires_at.map(int))
                .push_bind(int(h.created_at));
        });
        qb.push(
            " ON CONFLICT(pool, id) DO UPDATE SET batch_id = excluded.batch_id, vm_id = excluded.vm_id,
              expires_at = excluded.expires_at, created_at = excluded.created_at",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

pub(super) async fn upsert_nodes(conn: &mut SqliteConnection, rows: &[&NodeRecord]) -> Result<(), StoreError> {
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::new(
            "INSERT INTO nodes (id, name, driver, cores, ram_mb, disk_mb, address, state, created_at, remote, class, admin, credential_hash) ",
        );
        qb.push_values(chunk, |mut b, n| {
            b.push_bind(int(n.id))
                .push_bind(n.name.as_str())
                .push_bind(n.driver.as_str())
                .push_bind(i64::from(n.cores))
                .push_bind(int(n.ram_mb))
                .push_bind(int(n.disk_mb))
                .push_bind(n.address.as_str())
                .push_bind(n.state.as_str())
                .push_bind(int(n.created_at))
                .push_bind(n.remote)
                .push_bind(n.class.as_str())
                .push_bind(n.admin.as_str())
                .push_bind(n.credential_hash.as_deref());
        });
        qb.push(
            " ON CONFLICT(id) DO UPDATE SET name = excluded.name, driver = excluded.driver, cores = excluded.cores,
              ram_mb = excluded.ram_mb, disk_mb = excluded.disk_mb, address = excluded.address,
              state = excluded.state, created_at = excluded.created_at, remote = excluded.remote, class = excluded.class,
              credential_hash = excluded.credential_hash",
        );
        run(qb, conn).await?;
    }
    Ok(())
}
