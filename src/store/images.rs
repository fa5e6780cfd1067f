//! Image and upload rows: the `ImageStore` trait and its SQLite implementation.
//!
//! An image row is only ever written together with the deletion of the upload that produced
//! it (one transaction), and an upload is only created inside a transaction that first checks
//! no image has that SHA-256, so one content never has both an upload and an image. The piece
//! manifest is a JSON array read only by `manifest`, so listings stay small.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::StoreError;
use super::sqlite::{SqliteStore, int, json};

/// What a VM built from an image needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

/// A complete, verified image (its piece hashes are read apart, by `ImageStore::manifest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub sha256: String,
    pub name: String,
    pub readme: String,
    pub requirements: Requirements,
    pub size: u64,
    pub piece_size: u64,
    pub created_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRecord {
    pub id: String,
    pub sha256: String,
    pub name: String,
    pub readme: String,
    pub requirements: Requirements,
    pub size: u64,
    /// Bytes of the staging file known to be on disk.
    pub received: u64,
    pub created_at: u64,
}

/// The outcome of `begin_upload`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginUpload {
    Created(UploadRecord),
    /// An upload of that SHA-256 already existed; it is returned unchanged.
    Existing(UploadRecord),
    /// An image with that SHA-256 exists; nothing was written.
    ImageExists,
}

#[async_trait::async_trait]
pub trait ImageStore: Send + Sync {
    /// In one transaction: refuse if the image exists, else return the upload of that SHA-256,
    /// creating `new` if there is none.
    async fn begin_upload(&self, new: &UploadRecord) -> Result<BeginUpload, StoreError>;
    async fn upload(&self, id: &str) -> Result<Option<UploadRecord>, StoreError>;
    async fn uploads(&self) -> Result<Vec<UploadRecord>, StoreError>;
    /// False if there is no such upload.
    async fn set_received(&self, id: &str, received: u64) -> Result<bool, StoreError>;
    /// False if there is no such upload.
    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError>;
    /// Insert the image and delete upload `id`, in one transaction.
    async fn complete_upload(&self, id: &str, image: &ImageRecord, pieces: &[String]) -> Result<(), StoreError>;
    /// Every image, oldest first.
    async fn images(&self) -> Result<Vec<ImageRecord>, StoreError>;
    async fn image(&self, sha256: &str) -> Result<Option<ImageRecord>, StoreError>;
    /// The image's piece hashes in piece order; `None` if there is no such image.
    async fn manifest(&self, sha256: &str) -> Result<Option<Vec<String>>, StoreError>;
    /// False if there is no such image.
    async fn delete_image(&self, sha256: &str) -> Result<bool, StoreError>;
}

const IMAGE_COLUMNS: &str = "sha256, name, readme, cores, ram_mb, disk_mb, size, piece_size, created_at";

#[async_trait::async_trait]
impl ImageStore for SqliteStore {
    async fn begin_upload(&self, new: &UploadRecord) -> Result<BeginUpload, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let image = sqlx::query("SELECT 1 FROM images WHERE sha256 = ?").bind(&new.sha256).fetch_optional(&mut *tx).await?;
        if image.is_some() {
            return Ok(BeginUpload::ImageExists);
        }
        let existing = sqlx::query("SELECT * FROM uploads WHERE sha256 = ?").bind(&new.sha256).fetch_optional(&mut *tx).await?;
        if let Some(row) = existing {
            return Ok(BeginUpload::Existing(upload_from_row(&row)?));
        }
        sqlx::query(
            "INSERT INTO uploads (id, sha256, name, readme, requirements, size, received, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        let row = sqlx::query("SELECT * FROM uploads WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(upload_from_row).transpose()
    }

    async fn uploads(&self) -> Result<Vec<UploadRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM uploads ORDER BY created_at, id").fetch_all(&self.pool).await?;
        rows.iter().map(upload_from_row).collect()
    }

    async fn set_received(&self, id: &str, received: u64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE uploads SET received = ? WHERE id = ?").bind(int(received)).bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM uploads WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn complete_upload(&self, id: &str, image: &ImageRecord, pieces: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO images (sha256, name, readme, cores, ram_mb, disk_mb, size, piece_size, pieces, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        sqlx::query("DELETE FROM uploads WHERE id = ?").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY created_at, sha256")).fetch_all(&self.pool).await?;
        rows.iter().map(image_from_row).collect()
    }

    async fn image(&self, sha256: &str) -> Result<Option<ImageRecord>, StoreError> {
        let row =
            sqlx::query(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE sha256 = ?")).bind(sha256).fetch_optional(&self.pool).await?;
        row.as_ref().map(image_from_row).transpose()
    }

    async fn manifest(&self, sha256: &str) -> Result<Option<Vec<String>>, StoreError> {
        let row = sqlx::query("SELECT pieces FROM images WHERE sha256 = ?").bind(sha256).fetch_optional(&self.pool).await?;
        row.map(|r| {
            let text: String = r.try_get("pieces")?;
            serde_json::from_str(&text).map_err(|e| StoreError::Query(format!("column pieces: bad json: {e}")))
        })
        .transpose()
    }

    async fn delete_image(&self, sha256: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM images WHERE sha256 = ?").bind(sha256).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }
}

fn get_u64(row: &SqliteRow, col: &str) -> Result<u64, StoreError> {
    Ok(row.try_get::<i64, _>(col)? as u64)
}

fn image_from_row(row: &SqliteRow) -> Result<ImageRecord, StoreError> {
    let cores: i64 = row.try_get("cores")?;
    Ok(ImageRecord {
        sha256: row.try_get("sha256")?,
        name: row.try_get("name")?,
        readme: row.try_get("readme")?,
        requirements: Requirements {
            cores: u32::try_from(cores).map_err(|_| StoreError::Query(format!("column cores: {cores} is out of range")))?,
            ram_mb: get_u64(row, "ram_mb")?,
            disk_mb: get_u64(row, "disk_mb")?,
        },
        size: get_u64(row, "size")?,
        piece_size: get_u64(row, "piece_size")?,
        created_at: get_u64(row, "created_at")?,
    })
}

fn upload_from_row(row: &SqliteRow) -> Result<UploadRecord, StoreError> {
    let requirements: String = row.try_get("requirements")?;
    Ok(UploadRecord {
        id: row.try_get("id")?,
        sha256: row.try_get("sha256")?,
        name: row.try_get("name")?,
        readme: row.try_get("readme")?,
        requirements: serde_json::from_str(&requirements).map_err(|e| StoreError::Query(format!("column requirements: bad json: {e}")))?,
        size: get_u64(row, "size")?,
        received: get_u64(row, "received")?,
        created_at: get_u64(row, "created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_stores::each_store;

    fn upload(id: &str, sha: &str) -> UploadRecord {
        UploadRecord {
            id: id.into(),
            sha256: sha.into(),
            name: "debian".into(),
            readme: "a readme".into(),
            requirements: Requirements { cores: 2, ram_mb: 2048, disk_mb: 10_240 },
            size: 10,
            received: 0,
            created_at: 5,
        }
    }

    fn image_of(up: &UploadRecord) -> ImageRecord {
        ImageRecord {
            sha256: up.sha256.clone(),
            name: up.name.clone(),
            readme: up.readme.clone(),
            requirements: up.requirements,
            size: up.size,
            piece_size: 4,
            created_at: 9,
        }
    }

    each_store! {
        #[tokio::test]
        async fn an_upload_becomes_an_image_in_one_step_and_cannot_be_begun_again(s) {
            let images = s.store.images().expect("both stores hold images");
            let up = upload("u1", "aa");
            assert_eq!(images.begin_upload(&up).await.unwrap(), BeginUpload::Created(up.clone()));
            assert!(images.set_received(&up.id, 7).await.unwrap());
            let again = images.begin_upload(&upload("u2", "aa")).await.unwrap();
            assert_eq!(again, BeginUpload::Existing(UploadRecord { received: 7, ..up.clone() }), "same content resumes the first upload");
            assert_eq!(images.uploads().await.unwrap().len(), 1);

            let pieces = vec!["p0".to_string(), "p1".into(), "p2".into()];
            images.complete_upload(&up.id, &image_of(&up), &pieces).await.unwrap();
            assert_eq!(images.upload(&up.id).await.unwrap(), None, "the upload is gone with the same commit");
            assert_eq!(images.images().await.unwrap(), vec![image_of(&up)]);
            assert_eq!(images.manifest("aa").await.unwrap(), Some(pieces));
            assert_eq!(images.begin_upload(&upload("u3", "aa")).await.unwrap(), BeginUpload::ImageExists);
            assert!(images.uploads().await.unwrap().is_empty(), "a refused begin writes nothing");

            assert!(images.delete_image("aa").await.unwrap());
            assert!(!images.delete_image("aa").await.unwrap());
            assert_eq!(images.image("aa").await.unwrap(), None);
            assert_eq!(images.manifest("aa").await.unwrap(), None);
            assert!(!images.set_received("nope", 1).await.unwrap());
            assert!(!images.delete_upload("nope").await.unwrap());
        }
    }
}
