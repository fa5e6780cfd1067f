//! Migration rows (specs/migration.md): endpoints, the resources each source holds, and
//! migrations. The `MigrationStore` trait and its SQLite implementation; the Postgres half is
//! `postgres_migrations.rs`, with the same semantics.
//!
//! Every method is one transaction and durable when it returns. Ids are never reused (a
//! finished migration keeps naming its resource and destination after they are gone). Endpoint
//! parameters are stored as given, secrets included, because workers need them to connect;
//! only `Endpoint::redacted()` may leave the hive.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::StoreError;
use super::sqlite::{SqliteStore, int, json};
use crate::domain::migration::{
    Discovered, Endpoint, EndpointState, Event, Migration, Resource, ResourceDiff, ResourceKind, Role, Status, reconcile,
};

/// The SQL list of finished statuses: only these rows may be deleted.
pub(super) const FINISHED: &str = "('Completed', 'Error', 'Cancelled')";

/// What became of an endpoint update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointUpdate {
    Done,
    NotFound,
    /// Another endpoint of the same role has that name; nothing written.
    NameTaken,
}

#[async_trait::async_trait]
pub trait MigrationStore: Send + Sync {
    /// Insert `e` (its `id` is ignored) and answer its id; `None` (nothing written) when an
    /// endpoint of the same role already has its name.
    async fn insert_endpoint(&self, e: &Endpoint) -> Result<Option<u64>, StoreError>;
    /// Rewrite endpoint `e.id`: everything but its id and role (resources hang off a source).
    async fn update_endpoint(&self, e: &Endpoint) -> Result<EndpointUpdate, StoreError>;
    /// Write only the heartbeat fields of `e.id` (state, last_seen, checked_by), so a heartbeat
    /// never undoes an edit of the parameters. False when there is no such endpoint or a newer
    /// heartbeat is stored already (several hive instances may hear them).
    async fn set_endpoint_health(&self, e: &Endpoint) -> Result<bool, StoreError>;
    /// Delete an endpoint and, if a source, its resources. False if there is no such endpoint.
    async fn delete_endpoint(&self, id: u64) -> Result<bool, StoreError>;
    /// Every endpoint, by id.
    async fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError>;
    async fn endpoint(&self, id: u64) -> Result<Option<Endpoint>, StoreError>;
    /// Make `discovered` the source's resource list (`reconcile`: ids and `migrated` flags kept
    /// for what is still there), in one transaction serialised with other reports of the same
    /// source. Answers the diff, `added` with their new ids; `None` if `source_id` is not a
    /// source endpoint.
    async fn replace_resources(&self, source_id: u64, discovered: Vec<Discovered>) -> Result<Option<ResourceDiff>, StoreError>;
    /// Resources by id: one source's, or every source's.
    async fn resources(&self, source_id: Option<u64>) -> Result<Vec<Resource>, StoreError>;
    async fn resource(&self, id: u64) -> Result<Option<Resource>, StoreError>;
    /// False if there is no such resource.
    async fn set_resource_migrated(&self, id: u64, migrated: bool) -> Result<bool, StoreError>;
    /// Insert `m` (its `id` is ignored); answers the id it was given.
    async fn insert_migration(&self, m: &Migration) -> Result<u64, StoreError>;
    /// Rewrite migration `m.id` (all but id and created_at) if its stored status is still
    /// `expected`: false (nothing written) if another writer moved it meanwhile, e.g. a cancel
    /// racing a worker's report, or if there is no such migration.
    async fn update_migration(&self, m: &Migration, expected: Status) -> Result<bool, StoreError>;
    /// Delete a finished migration (Completed, Error, Cancelled); false if there is no such
    /// migration or it is still running.
    async fn delete_migration(&self, id: u64) -> Result<bool, StoreError>;
    /// Every migration, by id.
    async fn migrations(&self) -> Result<Vec<Migration>, StoreError>;
    async fn migration(&self, id: u64) -> Result<Option<Migration>, StoreError>;
}

/// A unique constraint refused the statement.
pub(super) fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

pub(super) fn bad_value(table: &str, col: &str, v: &str) -> StoreError {
    StoreError::Query(format!("{table}.{col}: unknown value {v:?}"))
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(table: &str, col: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Query(format!("{table}.{col}: bad json: {e}")))
}

#[async_trait::async_trait]
impl MigrationStore for SqliteStore {
    async fn insert_endpoint(&self, e: &Endpoint) -> Result<Option<u64>, StoreError> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO migration_endpoints (role, name, kind, params, state, last_seen, checked_by)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(e.role.name())
        .bind(e.name.as_str())
        .bind(e.kind.as_str())
        .bind(json(&e.params)?)
        .bind(e.state.name())
        .bind(e.last_seen.map(int))
        .bind(e.checked_by.map(int))
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(|i| i as u64))
    }

    async fn update_endpoint(&self, e: &Endpoint) -> Result<EndpointUpdate, StoreError> {
        let done = sqlx::query(
            "UPDATE migration_endpoints SET name = ?, kind = ?, params = ?, state = ?, last_seen = ?, checked_by = ? WHERE id = ?",
        )
        .bind(e.name.as_str())
        .bind(e.kind.as_str())
        .bind(json(&e.params)?)
        .bind(e.state.name())
        .bind(e.last_seen.map(int))
        .bind(e.checked_by.map(int))
        .bind(int(e.id))
        .execute(&self.pool)
        .await;
        match done {
            Ok(r) if r.rows_affected() == 1 => Ok(EndpointUpdate::Done),
            Ok(_) => Ok(EndpointUpdate::NotFound),
            Err(err) if unique_violation(&err) => Ok(EndpointUpdate::NameTaken),
            Err(err) => Err(err.into()),
        }
    }

    async fn set_endpoint_health(&self, e: &Endpoint) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE migration_endpoints SET state = ?1, last_seen = ?2, checked_by = ?3
             WHERE id = ?4 AND (last_seen IS NULL OR ?2 IS NULL OR last_seen <= ?2)",
        )
        .bind(e.state.name())
        .bind(e.last_seen.map(int))
        .bind(e.checked_by.map(int))
        .bind(int(e.id))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn delete_endpoint(&self, id: u64) -> Result<bool, StoreError> {
        // Foreign keys are on: ON DELETE CASCADE takes the source's resources along.
        let r = sqlx::query("DELETE FROM migration_endpoints WHERE id = ?").bind(int(id)).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let rows = sqlx::query("SELECT * FROM migration_endpoints ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn endpoint(&self, id: u64) -> Result<Option<Endpoint>, StoreError> {
        let row = sqlx::query("SELECT * FROM migration_endpoints WHERE id = ?").bind(int(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(endpoint_from_row).transpose()
    }

    async fn replace_resources(&self, source_id: u64, discovered: Vec<Discovered>) -> Result<Option<ResourceDiff>, StoreError> {
        // IMMEDIATE: the write lock is taken before reading, so two reports of one source apply
        // one after the other instead of both inserting the same new resource.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM migration_endpoints WHERE id = ?").bind(int(source_id)).fetch_optional(&mut *tx).await?;
        if role.as_deref() != Some(Role::Source.name()) {
            return Ok(None);
        }
        let rows = sqlx::query("SELECT * FROM migration_resources WHERE source_id = ? ORDER BY id")
            .bind(int(source_id))
            .fetch_all(&mut *tx)
            .await?;
        let existing = rows.iter().map(resource_from_row).collect::<Result<Vec<_>, _>>()?;
        let mut diff = reconcile(source_id, &existing, discovered);
        for r in &diff.removed {
            sqlx::query("DELETE FROM migration_resources WHERE id = ?").bind(int(r.id)).execute(&mut *tx).await?;
        }
        for r in &diff.updated {
            sqlx::query("UPDATE migration_resources SET kind = ?, name = ?, properties = ? WHERE id = ?")
                .bind(r.kind.name())
                .bind(r.name.as_str())
                .bind(json(&r.properties)?)
                .bind(int(r.id))
                .execute(&mut *tx)
                .await?;
        }
        for r in &mut diff.added {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO migration_resources (source_id, id_at_source, kind, name, properties, migrated)
                 VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(int(source_id))
            .bind(r.id_at_source.as_str())
            .bind(r.kind.name())
            .bind(r.name.as_str())
            .bind(json(&r.properties)?)
            .bind(r.migrated)
            .fetch_one(&mut *tx)
            .await?;
            r.id = id as u64;
        }
        tx.commit().await?;
        Ok(Some(diff))
    }

    async fn resources(&self, source_id: Option<u64>) -> Result<Vec<Resource>, StoreError> {
        let rows = sqlx::query("SELECT * FROM migration_resources WHERE ?1 IS NULL OR source_id = ?1 ORDER BY id")
            .bind(source_id.map(int))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(resource_from_row).collect()
    }

    async fn resource(&self, id: u64) -> Result<Option<Resource>, StoreError> {
        let row = sqlx::query("SELECT * FROM migration_resources WHERE id = ?").bind(int(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(resource_from_row).transpose()
    }

    async fn set_resource_migrated(&self, id: u64, migrated: bool) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE migration_resources SET migrated = ? WHERE id = ?")
            .bind(migrated)
            .bind(int(id))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn insert_migration(&self, m: &Migration) -> Result<u64, StoreError> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO vm_migrations (name, description, resource_id, destination_id, status, event, progress, error, worker,
                                        attempts, result, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(m.name.as_str())
        .bind(m.description.as_str())
        .bind(int(m.resource_id))
        .bind(int(m.destination_id))
        .bind(m.status.name())
        .bind(m.event.code())
        .bind(i64::from(m.progress))
        .bind(m.error.as_deref())
        .bind(m.worker.map(int))
        .bind(json(&m.attempts)?)
        .bind(m.result.as_ref().map(json).transpose()?)
        .bind(int(m.created_at))
        .bind(int(m.updated_at))
        .fetch_one(&self.pool)
        .await?;
        Ok(id as u64)
    }

    async fn update_migration(&self, m: &Migration, expected: Status) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE vm_migrations SET name = ?, description = ?, resource_id = ?, destination_id = ?, status = ?, event = ?,
                    progress = ?, error = ?, worker = ?, attempts = ?, result = ?, updated_at = ?
             WHERE id = ? AND status = ?",
        )
        .bind(m.name.as_str())
        .bind(m.description.as_str())
        .bind(int(m.resource_id))
        .bind(int(m.destination_id))
        .bind(m.status.name())
        .bind(m.event.code())
        .bind(i64::from(m.progress))
        .bind(m.error.as_deref())
        .bind(m.worker.map(int))
        .bind(json(&m.attempts)?)
        .bind(m.result.as_ref().map(json).transpose()?)
        .bind(int(m.updated_at))
        .bind(int(m.id))
        .bind(expected.name())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn delete_migration(&self, id: u64) -> Result<bool, StoreError> {
        let q = format!("DELETE FROM vm_migrations WHERE id = ? AND status IN {FINISHED}");
        let r = sqlx::query(&q).bind(int(id)).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn migrations(&self) -> Result<Vec<Migration>, StoreError> {
        let rows = sqlx::query("SELECT * FROM vm_migrations ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(migration_from_row).collect()
    }

    async fn migration(&self, id: u64) -> Result<Option<Migration>, StoreError> {
        let row = sqlx::query("SELECT * FROM vm_migrations WHERE id = ?").bind(int(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(migration_from_row).transpose()
    }
}

fn u64_col(r: &SqliteRow, col: &str) -> Result<u64, StoreError> {
    Ok(r.try_get::<i64, _>(col)? as u64)
}

fn opt_u64_col(r: &SqliteRow, col: &str) -> Result<Option<u64>, StoreError> {
    Ok(r.try_get::<Option<i64>, _>(col)?.map(|v| v as u64))
}

fn endpoint_from_row(r: &SqliteRow) -> Result<Endpoint, StoreError> {
    let role: String = r.try_get("role")?;
    let state: String = r.try_get("state")?;
    Ok(Endpoint {
        id: u64_col(r, "id")?,
        role: Role::parse(&role).ok_or_else(|| bad_value("migration_endpoints", "role", &role))?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        params: parse_json("migration_endpoints", "params", &r.try_get::<String, _>("params")?)?,
        state: EndpointState::parse(&state).ok_or_else(|| bad_value("migration_endpoints", "state", &state))?,
        last_seen: opt_u64_col(r, "last_seen")?,
        checked_by: opt_u64_col(r, "checked_by")?,
    })
}

fn resource_from_row(r: &SqliteRow) -> Result<Resource, StoreError> {
    let kind: String = r.try_get("kind")?;
    Ok(Resource {
        id: u64_col(r, "id")?,
        source_id: u64_col(r, "source_id")?,
        id_at_source: r.try_get("id_at_source")?,
        kind: ResourceKind::parse(&kind).ok_or_else(|| bad_value("migration_resources", "kind", &kind))?,
        name: r.try_get("name")?,
        properties: parse_json("migration_resources", "properties", &r.try_get::<String, _>("properties")?)?,
        migrated: r.try_get("migrated")?,
    })
}

fn migration_from_row(r: &SqliteRow) -> Result<Migration, StoreError> {
    let status: String = r.try_get("status")?;
    let event: String = r.try_get("event")?;
    let progress: i64 = r.try_get("progress")?;
    Ok(Migration {
        id: u64_col(r, "id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        resource_id: u64_col(r, "resource_id")?,
        destination_id: u64_col(r, "destination_id")?,
        status: Status::parse(&status).ok_or_else(|| bad_value("vm_migrations", "status", &status))?,
        event: Event::from_code(&event).ok_or_else(|| bad_value("vm_migrations", "event", &event))?,
        progress: u8::try_from(progress).map_err(|_| bad_value("vm_migrations", "progress", &progress.to_string()))?,
        error: r.try_get("error")?,
        worker: opt_u64_col(r, "worker")?,
        attempts: parse_json("vm_migrations", "attempts", &r.try_get::<String, _>("attempts")?)?,
        result: r.try_get::<Option<String>, _>("result")?.map(|t| parse_json("vm_migrations", "result", &t)).transpose()?,
        created_at: u64_col(r, "created_at")?,
        updated_at: u64_col(r, "updated_at")?,
    })
}

#[cfg(test)]
mod tests;
