//! The Postgres half of `MigrationStore` (migrations.rs), with the SQLite half's semantics.
//! Where SQLite serialises a source's reports with `BEGIN IMMEDIATE`, this side locks the
//! source's endpoint row (`FOR UPDATE`), so reports reaching several hive instances apply one
//! after the other. Identity columns give ids that are never reused.

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::StoreError;
use super::migrations::{EndpointUpdate, FINISHED, MigrationStore, bad_value, parse_json, unique_violation};
use super::postgres::PostgresStore;
use super::postgres_rows::{get_opt_u64, get_u64, int, json};
use crate::domain::migration::{
    Discovered, Endpoint, EndpointState, Event, Migration, Resource, ResourceDiff, ResourceKind, Role, Status, reconcile,
};

#[async_trait::async_trait]
impl MigrationStore for PostgresStore {
    async fn insert_endpoint(&self, e: &Endpoint) -> Result<Option<u64>, StoreError> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO migration_endpoints (role, name, kind, params, state, last_seen, checked_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id",
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
            "UPDATE migration_endpoints SET name = $1, kind = $2, params = $3, state = $4, last_seen = $5, checked_by = $6
             WHERE id = $7",
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
            "UPDATE migration_endpoints SET state = $1, last_seen = $2, checked_by = $3
             WHERE id = $4 AND (last_seen IS NULL OR $2::BIGINT IS NULL OR last_seen <= $2)",
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
        // ON DELETE CASCADE takes the source's resources along.
        let r = sqlx::query("DELETE FROM migration_endpoints WHERE id = $1").bind(int(id)).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let rows = sqlx::query("SELECT * FROM migration_endpoints ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn endpoint(&self, id: u64) -> Result<Option<Endpoint>, StoreError> {
        let row = sqlx::query("SELECT * FROM migration_endpoints WHERE id = $1").bind(int(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(endpoint_from_row).transpose()
    }

    async fn replace_resources(&self, source_id: u64, discovered: Vec<Discovered>) -> Result<Option<ResourceDiff>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The row lock makes a concurrent report of the same source wait until this one commits.
        let role: Option<String> = sqlx::query_scalar("SELECT role FROM migration_endpoints WHERE id = $1 FOR UPDATE")
            .bind(int(source_id))
            .fetch_optional(&mut *tx)
            .await?;
        if role.as_deref() != Some(Role::Source.name()) {
            return Ok(None);
        }
        let rows = sqlx::query("SELECT * FROM migration_resources WHERE source_id = $1 ORDER BY id")
            .bind(int(source_id))
            .fetch_all(&mut *tx)
            .await?;
        let existing = rows.iter().map(resource_from_row).collect::<Result<Vec<_>, _>>()?;
        let mut diff = reconcile(source_id, &existing, discovered);
        if !diff.removed.is_empty() {
            let ids: Vec<i64> = diff.removed.iter().map(|r| int(r.id)).collect();
            sqlx::query("DELETE FROM migration_resources WHERE id = ANY($1)").bind(ids).execute(&mut *tx).await?;
        }
        for r in &diff.updated {
            sqlx::query("UPDATE migration_resources SET kind = $1, name = $2, properties = $3 WHERE id = $4")
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
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
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
        let rows = sqlx::query("SELECT * FROM migration_resources WHERE $1::BIGINT IS NULL OR source_id = $1 ORDER BY id")
            .bind(source_id.map(int))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(resource_from_row).collect()
    }

    async fn resource(&self, id: u64) -> Result<Option<Resource>, StoreError> {
        let row = sqlx::query("SELECT * FROM migration_resources WHERE id = $1").bind(int(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(resource_from_row).transpose()
    }

    async fn set_resource_migrated(&self, id: u64, migrated: bool) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE migration_resources SET migrated = $1 WHERE id = $2")
            .bind(migrated)
            .bind(int(id))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn insert_migration(&self, m: &Migration) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO vm_migrations (name, description, resource_id, destination_id, status, event, progress, error, worker,
                                        attempts, result, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id",
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
        get_u64(&row, "id")
    }

    async fn update_migration(&self, m: &Migration, expected: Status) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE vm_migrations SET name = $1, description = $2, resource_id = $3, destination_id = $4, status = $5, event = $6,
                    progress = $7, error = $8, worker = $9, attempts = $10, result = $11, updated_at = $12
             WHERE id = $13 AND status = $14",
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
        let q = format!("DELETE FROM vm_migrations WHERE id = $1 AND status IN {FINISHED}");
        let r = sqlx::query(&q).bind(int(id)).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn migrations(&self) -> Result<Vec<Migration>, StoreError> {
        let rows = sqlx::query("SELECT * FROM vm_migrations ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(migration_from_row).collect()
    }

    async fn migration(&self, id: u64) -> Result<Option<Migration>, StoreError> {
        let row = sqlx::query("SELECT * FROM vm_migrations WHERE id = $1").bind(int(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(migration_from_row).transpose()
    }
}

fn endpoint_from_row(r: &PgRow) -> Result<Endpoint, StoreError> {
    let role: String = r.try_get("role")?;
    let state: String = r.try_get("state")?;
    Ok(Endpoint {
        id: get_u64(r, "id")?,
        role: Role::parse(&role).ok_or_else(|| bad_value("migration_endpoints", "role", &role))?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        params: parse_json("migration_endpoints", "params", &r.try_get::<String, _>("params")?)?,
        state: EndpointState::parse(&state).ok_or_else(|| bad_value("migration_endpoints", "state", &state))?,
        last_seen: get_opt_u64(r, "last_seen")?,
        checked_by: get_opt_u64(r, "checked_by")?,
    })
}

fn resource_from_row(r: &PgRow) -> Result<Resource, StoreError> {
    let kind: String = r.try_get("kind")?;
    Ok(Resource {
        id: get_u64(r, "id")?,
        source_id: get_u64(r, "source_id")?,
        id_at_source: r.try_get("id_at_source")?,
        kind: ResourceKind::parse(&kind).ok_or_else(|| bad_value("migration_resources", "kind", &kind))?,
        name: r.try_get("name")?,
        properties: parse_json("migration_resources", "properties", &r.try_get::<String, _>("properties")?)?,
        migrated: r.try_get("migrated")?,
    })
}

fn migration_from_row(r: &PgRow) -> Result<Migration, StoreError> {
    let status: String = r.try_get("status")?;
    let event: String = r.try_get("event")?;
    let progress: i64 = r.try_get("progress")?;
    Ok(Migration {
        id: get_u64(r, "id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        resource_id: get_u64(r, "resource_id")?,
        destination_id: get_u64(r, "destination_id")?,
        status: Status::parse(&status).ok_or_else(|| bad_value("vm_migrations", "status", &status))?,
        event: Event::from_code(&event).ok_or_else(|| bad_value("vm_migrations", "event", &event))?,
        progress: u8::try_from(progress).map_err(|_| bad_value("vm_migrations", "progress", &progress.to_string()))?,
        error: r.try_get("error")?,
        worker: get_opt_u64(r, "worker")?,
        attempts: parse_json("vm_migrations", "attempts", &r.try_get::<String, _>("attempts")?)?,
        result: r.try_get::<Option<String>, _>("result")?.map(|t| parse_json("vm_migrations", "result", &t)).transpose()?,
        created_at: get_u64(r, "created_at")?,
        updated_at: get_u64(r, "updated_at")?,
    })
}
