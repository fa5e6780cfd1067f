//! Row writes and reads of the Postgres store: one multi-row `INSERT … ON CONFLICT` per table
//! for a group (the SQLite store's `Plan`, run with Postgres statements), single changes in
//! order otherwise, and the row → domain decoding. Functions return `sqlx::Error` so `apply` can
//! tell a retryable abort (deadlock, serialization failure) from a real failure.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use super::sqlite_rows::{Plan, PoolRow};
use super::{Change, NodeRecord, StoreError};
use crate::domain::pool::{Batch, Handle, PoolSize, PoolSnapshot};
use crate::domain::vm::{Placement, Vm, VmAddress, VmState};

/// Rows per statement: 13 columns × 1000 stays far below Postgres's 65,535 parameters.
const CHUNK: usize = 1000;

/// u64 → BIGINT, bit for bit; `uint` is the inverse.
pub(super) fn int(v: u64) -> i64 {
    v as i64
}

pub(super) fn uint(v: i64) -> u64 {
    v as u64
}

/// JSON text, exactly as the SQLite store writes it.
pub(super) fn json<T: Serialize + ?Sized>(v: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(v).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// Pools first (the other rows refer to them), then deletes, then the other upserts, then the
/// updates of rows an upsert may have inserted.
pub(super) async fn run_plan(conn: &mut PgConnection, plan: &Plan<'_>) -> Result<(), sqlx::Error> {
    upsert_pools(conn, &plan.pools).await?;
    for d in &plan.deletes {
        apply_one(conn, d).await?;
    }
    upsert_vms(conn, &plan.vms).await?;
    upsert_batches(conn, &plan.batches).await?;
    upsert_handles(conn, &plan.handles).await?;
    upsert_nodes(conn, &plan.nodes).await?;
    for u in &plan.updates {
        apply_one(conn, u).await?;
    }
    Ok(())
}

pub(super) async fn apply_one(conn: &mut PgConnection, change: &Change) -> Result<(), sqlx::Error> {
    let query = match change {
        Change::Pool { pool, size, next_vm, next_batch, next_handle, preps, pending } => {
            let row = PoolRow { pool, size: *size, counters: [*next_vm, *next_batch, *next_handle], preps, pending };
            return upsert_pools(conn, &[row]).await;
        }
        Change::PoolDeleted { pool } => {
            // ON DELETE CASCADE removes the pool's vms, batches and handles with it.
            sqlx::query("DELETE FROM pools WHERE name = $1").bind(pool)
        }
        Change::Vm { pool, vm } => return upsert_vms(conn, &[(pool, vm)]).await,
        Change::VmDeleted { pool, id } => sqlx::query("DELETE FROM vms WHERE pool = $1 AND id = $2").bind(pool).bind(int(*id)),
        Change::Batch { pool, batch } => return upsert_batches(conn, &[(pool, batch)]).await,
        Change::BatchDeleted { pool, id } => sqlx::query("DELETE FROM batches WHERE pool = $1 AND id = $2").bind(pool).bind(int(*id)),
        Change::Handle { pool, handle } => return upsert_handles(conn, &[(pool, handle)]).await,
        Change::HandleDeleted { pool, id } => sqlx::query("DELETE FROM handles WHERE pool = $1 AND id = $2").bind(pool).bind(int(*id)),
        Change::Node(n) => return upsert_nodes(conn, &[n]).await,
        Change::NodeDeleted { id } => sqlx::query("DELETE FROM nodes WHERE id = $1").bind(int(*id)),
        Change::NodeAdmin { id, admin } => sqlx::query("UPDATE nodes SET admin = $1 WHERE id = $2").bind(admin).bind(int(*id)),
        // Checked by `apply_once` before anything else.
        Change::Fence { .. } => return Ok(()),
        Change::Served(r) => {
            sqlx::query("INSERT INTO served (node_id, pool, handle, vm, cores, started_at, ended_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
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

async fn run(mut qb: QueryBuilder<'_, Postgres>, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    qb.build().execute(&mut *conn).await?;
    Ok(())
}

async fn upsert_pools(conn: &mut PgConnection, rows: &[PoolRow<'_>]) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK) {
        let mut encoded = Vec::with_capacity(chunk.len());
        for r in chunk {
            encoded.push((json(r.preps)?, json(r.pending)?));
        }
        let mut qb = QueryBuilder::new("INSERT INTO pools (name, min, max, linger, next_vm, next_batch, next_handle, preps, pending) ");
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
            " ON CONFLICT (name) DO UPDATE SET min = excluded.min, max = excluded.max, linger = excluded.linger,
              next_vm = excluded.next_vm, next_batch = excluded.next_batch, next_handle = excluded.next_handle,
              preps = excluded.preps, pending = excluded.pending",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

async fn upsert_vms(conn: &mut PgConnection, rows: &[(&str, &Vm)]) -> Result<(), sqlx::Error> {
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
            " ON CONFLICT (pool, id) DO UPDATE SET state = excluded.state, since = excluded.since,
              contact = excluded.contact, batch_id = excluded.batch_id, node_id = excluded.node_id,
              domain = excluded.domain, ip = excluded.ip, public_ip = excluded.public_ip,
              vnc_port = excluded.vnc_port, vnc_passwd = excluded.vnc_passwd, op = excluded.op",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

async fn upsert_batches(conn: &mut PgConnection, rows: &[(&str, &Batch)]) -> Result<(), sqlx::Error> {
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
            " ON CONFLICT (pool, id) DO UPDATE SET size = excluded.size, profile_name = excluded.profile_name,
              home_page = excluded.home_page, vms = excluded.vms, mark_delete = excluded.mark_delete",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

async fn upsert_handles(conn: &mut PgConnection, rows: &[(&str, &Handle)]) -> Result<(), sqlx::Error> {
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
            " ON CONFLICT (pool, id) DO UPDATE SET batch_id = excluded.batch_id, vm_id = excluded.vm_id,
              expires_at = excluded.expires_at, created_at = excluded.created_at",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

async fn upsert_nodes(conn: &mut PgConnection, rows: &[&NodeRecord]) -> Result<(), sqlx::Error> {
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
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name, driver = excluded.driver, cores = excluded.cores,
              ram_mb = excluded.ram_mb, disk_mb = excluded.disk_mb, address = excluded.address,
              state = excluded.state, created_at = excluded.created_at, remote = excluded.remote, class = excluded.class,
              credential_hash = excluded.credential_hash",
        );
        run(qb, conn).await?;
    }
    Ok(())
}

// ---- decoding ------------------------------------------------------------------------------

pub(super) fn get_u64(row: &PgRow, col: &str) -> Result<u64, StoreError> {
    Ok(uint(row.try_get::<i64, _>(col)?))
}

pub(super) fn get_opt_u64(row: &PgRow, col: &str) -> Result<Option<u64>, StoreError> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(uint))
}

pub(super) fn get_small<T: TryFrom<i64>>(row: &PgRow, col: &str) -> Result<T, StoreError> {
    let v: i64 = row.try_get(col)?;
    T::try_from(v).map_err(|_| StoreError::Query(format!("column {col}: {v} is out of range")))
}

pub(super) fn get_json<T: DeserializeOwned>(row: &PgRow, col: &str) -> Result<T, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Query(format!("column {col}: bad json: {e}")))
}

pub(super) fn pool_from_row(row: &PgRow) -> Result<PoolSnapshot, StoreError> {
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

pub(super) fn vm_from_row(row: &PgRow) -> Result<Vm, StoreError> {
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

pub(super) fn batch_from_row(row: &PgRow) -> Result<Batch, StoreError> {
    Ok(Batch {
        id: get_u64(row, "id")?,
        size: get_small(row, "size")?,
        profile_name: row.try_get("profile_name")?,
        home_page: row.try_get("home_page")?,
        vms: get_json(row, "vms")?,
        mark_delete: row.try_get("mark_delete")?,
    })
}

pub(super) fn handle_from_row(row: &PgRow) -> Result<Handle, StoreError> {
    Ok(Handle {
        id: get_u64(row, "id")?,
        batch: get_u64(row, "batch_id")?,
        vm: get_opt_u64(row, "vm_id")?,
        expires_at: get_opt_u64(row, "expires_at")?,
        created_at: get_u64(row, "created_at")?,
    })
}

pub(super) fn node_from_row(row: &PgRow) -> Result<NodeRecord, StoreError> {
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
