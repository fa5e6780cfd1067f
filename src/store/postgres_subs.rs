//! The Postgres halves of the sub-stores: `ImageStore` (images.rs), `NodeStore` (nodes.rs) and
//! `LifecycleStore` (lifecycle.rs), with the SQLite halves' semantics.
//!
//! Where SQLite relies on `BEGIN IMMEDIATE` serialising writers, this side takes a transaction
//! advisory lock on the image's SHA-256, so an upload and an image of one content never coexist
//! even with several hive instances. Identity columns give ids that are never reused. Text
//! ordering is `COLLATE "C"` (bytes), as in SQLite, whatever the database's collation.

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::images::{BeginUpload, ImageRecord, ImageStore, Requirements, UploadRecord};
use super::lifecycle::{LifecycleStore, UserRecord};
use super::nodes::{NodeStore, Rating};
use super::postgres::PostgresStore;
use super::postgres_rows::{get_json, get_opt_u64, get_small, get_u64, int, json};
use super::{ServedRecord, StoreError};
use crate::domain::lifecycle::{Kind, Object, Phase};

const IMAGE_COLUMNS: &str = "sha256, name, readme, cores, ram_mb, disk_mb, size, piece_size, created_at";

/// Serialises writers of one content (begin/complete upload) across connections and instances.
const LOCK_CONTENT: &str = "SELECT pg_advisory_xact_lock(hashtextextended('hive.image:' || $1, 0))";

#[async_trait::async_trait]
impl ImageStore for PostgresStore {
    async fn begin_upload(&self, new: &UploadRecord) -> Result<BeginUpload, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(LOCK_CONTENT).bind(&new.sha256).execute(&mut *tx).await?;
        let image = sqlx::query("SELECT 1 FROM images WHERE sha256 = $1").bind(&new.sha256).fetch_optional(&mut *tx).await?;
        if image.is_some() {
            return Ok(BeginUpload::ImageExists);
        }
        let existing = sqlx::query("SELECT * FROM uploads WHERE sha256 = $1").bind(&new.sha256).fetch_optional(&mut *tx).await?;
        if let Some(row) = existing {
            return Ok(BeginUpload::Existing(upload_from_row(&row)?));
        }
        sqlx::query(
            "INSERT INTO uploads (id, sha256, name, readme, requirements, size, received, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&new.id)
        .bind(&new.sha256)
        .bind(&new.name)
        .bind(&new.readme)
        .bind(json(&new.requirements)?)
        .bind(int(new.size))
        .bind(int(new.received))
        .bind(int(new.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(BeginUpload::Created(new.clone()))
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM uploads WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(upload_from_row).transpose()
    }

    async fn uploads(&self) -> Result<Vec<UploadRecord>, StoreError> {
        let rows = sqlx::query(r#"SELECT * FROM uploads ORDER BY created_at, id COLLATE "C""#).fetch_all(&self.pool).await?;
        rows.iter().map(upload_from_row).collect()
    }

    async fn set_received(&self, id: &str, received: u64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE uploads SET received = $1 WHERE id = $2").bind(int(received)).bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn complete_upload(&self, id: &str, image: &ImageRecord, pieces: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(LOCK_CONTENT).bind(&image.sha256).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO images (sha256, name, readme, cores, ram_mb, disk_mb, size, piece_size, pieces, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&image.sha256)
        .bind(&image.name)
        .bind(&image.readme)
        .bind(i64::from(image.requirements.cores))
        .bind(int(image.requirements.ram_mb))
        .bind(int(image.requirements.disk_mb))
        .bind(int(image.size))
        .bind(int(image.piece_size))
        .bind(json(pieces)?)
        .bind(int(image.created_at))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let q = format!(r#"SELECT {IMAGE_COLUMNS} FROM images ORDER BY created_at, sha256 COLLATE "C""#);
        let rows = sqlx::query(&q).fetch_all(&self.pool).await?;
        rows.iter().map(image_from_row).collect()
    }

    async fn image(&self, sha256: &str) -> Result<Option<ImageRecord>, StoreError> {
        let q = format!("SELECT {IMAGE_COLUMNS} FROM images WHERE sha256 = $1");
        let row = sqlx::query(&q).bind(sha256).fetch_optional(&self.pool).await?;
        row.as_ref().map(image_from_row).transpose()
    }

    async fn manifest(&self, sha256: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row = sqlx::query("SELECT pieces FROM images WHERE sha256 = $1").bind(sha256).fetch_optional(&self.pool).await?;
        row.map(|r| get_json(&r, "pieces")).transpose()
    }

    async fn delete_image(&self, sha256: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM images WHERE sha256 = $1").bind(sha256).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }
}

fn image_from_row(row: &PgRow) -> Result<ImageRecord, StoreError> {
    Ok(ImageRecord {
        sha256: row.try_get("sha256")?,
        name: row.try_get("name")?,
        readme: row.try_get("readme")?,
        requirements: Requirements { cores: get_small(row, "cores")?, ram_mb: get_u64(row, "ram_mb")?, disk_mb: get_u64(row, "disk_mb")? },
        size: get_u64(row, "size")?,
        piece_size: get_u64(row, "piece_size")?,
        created_at: get_u64(row, "created_at")?,
    })
}

fn upload_from_row(row: &PgRow) -> Result<UploadRecord, StoreError> {
    Ok(UploadRecord {
        id: row.try_get("id")?,
        sha256: row.try_get("sha256")?,
        name: row.try_get("name")?,
        readme: row.try_get("readme")?,
        requirements: get_json(row, "requirements")?,
        size: get_u64(row, "size")?,
        received: get_u64(row, "received")?,
        created_at: get_u64(row, "created_at")?,
    })
}

#[async_trait::async_trait]
impl NodeStore for PostgresStore {
    async fn add_join_token(&self, hash: &str, created_at: u64, expires_at: u64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO join_tokens (hash, created_at, expires_at) VALUES ($1, $2, $3)")
            .bind(hash)
            .bind(int(created_at))
            .bind(int(expires_at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn consume_join_token(&self, hash: &str, now: u64) -> Result<bool, StoreError> {
        // Under READ COMMITTED a racing UPDATE waits for the first and re-checks `used_at`.
        let r = sqlx::query("UPDATE join_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL AND expires_at > $1")
            .bind(int(now))
            .bind(hash)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn join_token_used_by(&self, hash: &str, node: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE join_tokens SET used_by = $1 WHERE hash = $2").bind(int(node)).bind(hash).execute(&self.pool).await?;
        Ok(())
    }

    async fn served(&self, node: u64, from: u64, to: u64) -> Result<Vec<ServedRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM served WHERE node_id = $1 AND ended_at > $2 AND started_at < $3 ORDER BY id")
            .bind(int(node))
            .bind(int(from))
            .bind(int(to))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(served_from_row).collect()
    }

    async fn last_served(&self, pool: &str, handle: u64) -> Result<Option<ServedRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM served WHERE pool = $1 AND handle = $2 ORDER BY id DESC LIMIT 1")
            .bind(pool)
            .bind(int(handle))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(served_from_row).transpose()
    }

    async fn add_rating(&self, r: &Rating) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO ratings (pool, handle, session_started, node_id, stars, comment, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(r.pool.as_str())
        .bind(int(r.handle))
        .bind(int(r.session_started))
        .bind(int(r.node_id))
        .bind(i64::from(r.stars))
        .bind(r.comment.as_str())
        .bind(int(r.created_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn max_issued_node_id(&self) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT MAX(m) AS m FROM (SELECT MAX(used_by) AS m FROM join_tokens UNION ALL SELECT MAX(id) FROM nodes
             UNION ALL SELECT MAX(node_id) FROM served UNION ALL SELECT MAX(node_id) FROM ratings) AS issued",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(get_opt_u64(&row, "m")?.unwrap_or(0))
    }

    async fn rating_totals(&self) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        // SUM of BIGINT is NUMERIC in Postgres; the cast keeps it an i64 like SQLite's.
        let rows = sqlx::query("SELECT node_id, COUNT(*) AS n, SUM(stars)::BIGINT AS s FROM ratings GROUP BY node_id ORDER BY node_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((get_u64(r, "node_id")?, get_u64(r, "n")?, get_u64(r, "s")?))).collect()
    }
}

fn served_from_row(r: &PgRow) -> Result<ServedRecord, StoreError> {
    Ok(ServedRecord {
        node_id: get_u64(r, "node_id")?,
        pool: r.try_get("pool")?,
        handle: get_u64(r, "handle")?,
        vm: get_u64(r, "vm")?,
        cores: get_small(r, "cores")?,
        started_at: get_u64(r, "started_at")?,
        ended_at: get_u64(r, "ended_at")?,
    })
}

#[async_trait::async_trait]
impl LifecycleStore for PostgresStore {
    async fn add_user(&self, u: &UserRecord) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO users (name, token_hash, max_environments, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(u.name.as_str())
        .bind(u.token_hash.as_str())
        .bind(i64::from(u.max_environments))
        .bind(int(u.created_at))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_max_environments(&self, name: &str, max: u32) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE users SET max_environments = $1 WHERE name = $2")
            .bind(i64::from(max))
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = sqlx::query(r#"SELECT * FROM users ORDER BY name COLLATE "C""#).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UserRecord {
                    name: r.try_get("name")?,
                    token_hash: r.try_get("token_hash")?,
                    max_environments: r.try_get::<i64, _>("max_environments")?.clamp(0, i64::from(u32::MAX)) as u32,
                    created_at: get_u64(r, "created_at")?,
                })
            })
            .collect()
    }

    async fn insert_object(&self, o: &Object) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO lifecycle_objects (kind, name, owner, parent, traits, phase, reason, spec, runtime, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
        )
        .bind(o.kind.name())
        .bind(o.name.as_str())
        .bind(o.owner.as_str())
        .bind(o.parent.map(int))
        .bind(json(&o.traits)?)
        .bind(o.phase.name())
        .bind(o.reason.as_deref())
        .bind(json(&o.spec)?)
        .bind(json(&o.runtime)?)
        .bind(int(o.created_at))
        .bind(int(o.updated_at))
        .fetch_one(&self.pool)
        .await?;
        get_u64(&row, "id")
    }

    async fn update_object(&self, o: &Object) -> Result<bool, StoreError> {
        // Kind, owner and parent never change after creation.
        let r = sqlx::query("UPDATE lifecycle_objects SET phase = $1, reason = $2, runtime = $3, updated_at = $4 WHERE id = $5")
            .bind(o.phase.name())
            .bind(o.reason.as_deref())
            .bind(json(&o.runtime)?)
            .bind(int(o.updated_at))
            .bind(int(o.id))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn delete_object(&self, id: u64) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM lifecycle_objects WHERE id = $1").bind(int(id)).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn objects(&self) -> Result<Vec<Object>, StoreError> {
        let rows = sqlx::query("SELECT * FROM lifecycle_objects ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(object_from_row).collect()
    }
}

fn object_from_row(r: &PgRow) -> Result<Object, StoreError> {
    let bad = |col: &str, v: String| StoreError::Query(format!("lifecycle_objects.{col}: unknown value {v:?}"));
    let kind: String = r.try_get("kind")?;
    let phase: String = r.try_get("phase")?;
    Ok(Object {
        id: get_u64(r, "id")?,
        kind: Kind::parse(&kind).ok_or_else(|| bad("kind", kind.clone()))?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        parent: get_opt_u64(r, "parent")?,
        traits: get_json(r, "traits")?,
        phase: Phase::parse(&phase).ok_or_else(|| bad("phase", phase.clone()))?,
        reason: r.try_get("reason")?,
        spec: get_json(r, "spec")?,
        runtime: get_json(r, "runtime")?,
        created_at: get_u64(r, "created_at")?,
        updated_at: get_u64(r, "updated_at")?,
    })
}
