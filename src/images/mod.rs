//! The image registry: resumable uploads of VM images to the hive, the images they become, and
//! the origin's side of distribution (manifest and pieces). A plain cloneable struct with async
//! methods, not an actor yet: its state is the store and the files, and the only coordination it
//! needs is one lock per SHA-256 (write, complete, abort and delete of one content run one at a time).
//!
//! Guarantees: an acknowledged chunk is fsynced and counted in the store; an image is listed only
//! once its blob has been re-hashed from disk, matched its SHA-256 and been renamed into
//! `images/blobs/<sha256>`; a checksum mismatch discards the upload and its staging file. On open,
//! files no row accounts for (left by a crash between a file step and its commit) are removed.

pub mod blob;
pub mod distribute;
mod types;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Mutex, OwnedMutexGuard};

pub use types::{ImageError, ImageView, Manifest, NAME_MAX_CHARS, UploadSpec, UploadView, check_sha256, check_upload_id};

use crate::actors::Clock;
use crate::config::ImagesConfig;
use crate::store::Store;
use crate::store::images::{BeginUpload, ImageRecord, ImageStore, UploadRecord};
use blob::{Dirs, MIB};

#[derive(Clone)]
pub struct ImageRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    dirs: Dirs,
    max_size: u64,
    piece_size: u64,
    chunk_max: u64,
    clock: Clock,
    locks: parking_lot::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl ImageRegistry {
    /// Create `data_dir/images/{blobs,uploads}` and remove files no row accounts for.
    pub async fn open(store: Arc<dyn Store>, data_dir: &Path, cfg: &ImagesConfig, clock: Clock) -> Result<ImageRegistry, ImageError> {
        let dirs = Dirs::create(data_dir).map_err(io_error)?;
        let inner = Inner {
            store,
            dirs,
            max_size: cfg.max_size_mb.saturating_mul(MIB),
            piece_size: cfg.piece_size_mb * MIB,
            chunk_max: cfg.chunk_mb * MIB,
            clock,
            locks: Default::default(),
        };
        let registry = ImageRegistry { inner: Arc::new(inner) };
        registry.sweep().await?;
        Ok(registry)
    }

    pub fn chunk_max(&self) -> u64 {
        self.inner.chunk_max
    }

    /// Start an upload, or return the existing upload of the same content (how a client
    /// resumes). `true` if it was created now.
    pub async fn begin(&self, spec: UploadSpec) -> Result<(UploadView, bool), ImageError> {
        spec.validate(self.inner.max_size)?;
        let new = UploadRecord {
            id: types::new_upload_id(),
            sha256: spec.sha256.clone(),
            name: spec.name.clone(),
            readme: spec.readme.clone().unwrap_or_default(),
            requirements: spec.requirements(),
            size: spec.size,
            received: 0,
            created_at: self.inner.clock.now(),
        };
        match self.db()?.begin_upload(&new).await? {
            BeginUpload::Created(u) => {
                tracing::info!(upload.id = %u.id, image.sha256 = %u.sha256, size = u.size, "upload started");
                Ok((self.view(&u), true))
            }
            BeginUpload::Existing(u) if u.size != spec.size => {
                Err(ImageError::UploadMismatch { sha256: u.sha256, size: u.size, asked: spec.size })
            }
            BeginUpload::Existing(u) => Ok((self.view(&self.reconcile(u).await?), false)),
            BeginUpload::ImageExists => Err(ImageError::Exists(spec.sha256)),
        }
    }

    pub async fn upload(&self, id: &str) -> Result<UploadView, ImageError> {
        let u = self.load_upload(id).await?;
        Ok(self.view(&self.reconcile(u).await?))
    }

    /// Append `data` at `offset`, which must be where the upload stands. Returns the new offset
    /// once the bytes are fsynced and counted.
    pub async fn write(&self, id: &str, offset: u64, data: Bytes) -> Result<u64, ImageError> {
        let (_guard, u) = self.lock_upload(id).await?;
        let len = data.len() as u64;
        if offset != u.received {
            return Err(ImageError::OffsetMismatch { expected: u.received, given: offset });
        }
        if len > self.inner.chunk_max {
            return Err(ImageError::ChunkTooLarge { max: self.inner.chunk_max });
        }
        if offset + len > u.size {
            return Err(ImageError::Invalid {
                field: "body",
                reason: format!("{len} bytes at offset {offset} go past the upload's size of {} bytes", u.size),
            });
        }
        if len == 0 {
            return Ok(offset);
        }
        let path = self.inner.dirs.staging(&u.id);
        match blocking(move || blob::write_at(&path, offset, &data)).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // The staging file lost bytes the store counted: rewind to what is there.
                let expected = self.rewind(&u).await?;
                return Err(ImageError::OffsetMismatch { expected, given: offset });
            }
            Err(e) => return Err(io_error(e)),
        }
        if !self.db()?.set_received(&u.id, offset + len).await? {
            return Err(ImageError::UnknownUpload(u.id));
        }
        crate::metrics::image_bytes_received(len);
        Ok(offset + len)
    }

    /// Verify the staged content against its SHA-256 (re-read from disk), move it into place and
    /// record the image with its piece manifest.
    pub async fn complete(&self, id: &str) -> Result<ImageView, ImageError> {
        let (guard, u) = self.lock_upload(id).await?;
        if u.received < u.size {
            return Err(ImageError::Incomplete { offset: u.received, size: u.size });
        }
        let (staging, blob_path) = (self.inner.dirs.staging(&u.id), self.inner.dirs.blob(&u.sha256));
        // No staging file but a blob: an earlier completion renamed it and stopped before its commit.
        let staged = staging.exists();
        let source = if staged { staging.clone() } else { blob_path.clone() };
        let (size, piece_size) = (u.size, self.inner.piece_size);
        let (actual, pieces) = match blocking(move || blob::digest_file(&source, size, piece_size)).await {
            Ok(d) => d,
            Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound) => {
                let offset = self.rewind(&u).await?;
                return Err(ImageError::Incomplete { offset, size });
            }
            Err(e) => return Err(io_error(e)),
        };
        if actual != u.sha256 {
            self.db()?.delete_upload(&u.id).await?;
            let bad = if staged { staging } else { blob_path };
            blocking(move || blob::remove(&bad)).await.map_err(io_error)?;
            crate::metrics::image_upload("checksum_mismatch");
            tracing::warn!(upload.id = %u.id, image.sha256 = %u.sha256, actual = %actual, "upload discarded: checksum mismatch");
            drop(guard);
            self.prune_locks();
            return Err(ImageError::ChecksumMismatch { expected: u.sha256, actual });
        }
        if staged {
            blocking(move || blob::publish(&staging, size, &blob_path)).await.map_err(io_error)?;
        }
        let image = ImageRecord {
            sha256: u.sha256.clone(),
            name: u.name.clone(),
            readme: u.readme.clone(),
            requirements: u.requirements,
            size,
            piece_size,
            created_at: self.inner.clock.now(),
        };
        self.db()?.complete_upload(&u.id, &image, &pieces).await?;
        crate::metrics::image_upload("complete");
        self.count_images().await;
        tracing::info!(upload.id = %u.id, image.sha256 = %u.sha256, size, pieces = pieces.len(), "image complete");
        drop(guard);
        self.prune_locks();
        Ok(ImageView::from(&image))
    }

    /// Abandon an upload and its staging file.
    pub async fn abort(&self, id: &str) -> Result<(), ImageError> {
        let (guard, u) = self.lock_upload(id).await?;
        self.db()?.delete_upload(&u.id).await?;
        let path = self.inner.dirs.staging(&u.id);
        blocking(move || blob::remove(&path)).await.map_err(io_error)?;
        crate::metrics::image_upload("aborted");
        tracing::info!(upload.id = %u.id, image.sha256 = %u.sha256, "upload aborted");
        drop(guard);
        self.prune_locks();
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<ImageView>, ImageError> {
        Ok(self.db()?.images().await?.iter().map(ImageView::from).collect())
    }

    pub async fn get(&self, sha256: &str) -> Result<ImageView, ImageError> {
        Ok(ImageView::from(&self.record(sha256).await?))
    }

    /// Forget the image, then remove its blob.
    pub async fn delete(&self, sha256: &str) -> Result<(), ImageError> {
        check_sha256(sha256)?;
        let guard = self.lock(sha256).await;
        if !self.db()?.delete_image(sha256).await? {
            return Err(ImageError::UnknownImage(sha256.to_string()));
        }
        let path = self.inner.dirs.blob(sha256);
        blocking(move || blob::remove(&path)).await.map_err(io_error)?;
        tracing::info!(image.sha256 = %sha256, "image deleted");
        self.count_images().await;
        drop(guard);
        self.prune_locks();
        Ok(())
    }

    pub async fn manifest(&self, sha256: &str) -> Result<Manifest, ImageError> {
        let image = self.record(sha256).await?;
        let pieces = self.db()?.manifest(sha256).await?.ok_or_else(|| ImageError::UnknownImage(sha256.to_string()))?;
        Ok(Manifest { sha256: image.sha256, size: image.size, piece_size: image.piece_size, pieces })
    }

    /// The bytes of piece `index`: a byte range of the blob.
    pub async fn piece(&self, sha256: &str, index: u64) -> Result<Bytes, ImageError> {
        let image = self.record(sha256).await?;
        let Some((start, len)) = blob::piece_range(image.size, image.piece_size, index) else {
            let count = blob::piece_count(image.size, image.piece_size);
            return Err(ImageError::UnknownPiece { sha256: image.sha256, index, count });
        };
        let path = self.inner.dirs.blob(sha256);
        let bytes = blocking(move || blob::read_range(&path, start, len)).await.map_err(io_error)?;
        crate::metrics::image_piece_served(len);
        Ok(Bytes::from(bytes))
    }

    // ---- internals ---------------------------------------------------------------------------

    /// Refresh `hive_images`; a failed read leaves the gauge as it was (the caller's work is done).
    async fn count_images(&self) {
        let Ok(db) = self.db() else { return };
        if let Ok(list) = db.images().await {
            crate::metrics::images(list.len());
        }
    }

    fn db(&self) -> Result<&dyn ImageStore, ImageError> {
        self.inner.store.images().ok_or(ImageError::NoImageStore)
    }

    fn view(&self, u: &UploadRecord) -> UploadView {
        UploadView::of(u, self.inner.chunk_max)
    }

    async fn record(&self, sha256: &str) -> Result<ImageRecord, ImageError> {
        check_sha256(sha256)?;
        self.db()?.image(sha256).await?.ok_or_else(|| ImageError::UnknownImage(sha256.to_string()))
    }

    async fn load_upload(&self, id: &str) -> Result<UploadRecord, ImageError> {
        check_upload_id(id)?;
        self.db()?.upload(id).await?.ok_or_else(|| ImageError::UnknownUpload(id.to_string()))
    }

    async fn lock(&self, sha256: &str) -> OwnedMutexGuard<()> {
        let m = self.inner.locks.lock().entry(sha256.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// Lock the upload's content, then read the upload again: it may have moved meanwhile.
    async fn lock_upload(&self, id: &str) -> Result<(OwnedMutexGuard<()>, UploadRecord), ImageError> {
        let u = self.load_upload(id).await?;
        let guard = self.lock(&u.sha256).await;
        let u = self.load_upload(id).await?;
        Ok((guard, u))
    }

    /// Locks nobody holds or waits for.
    fn prune_locks(&self) {
        self.inner.locks.lock().retain(|_, m| Arc::strong_count(m) > 1);
    }

    /// If the staging file is shorter than the store's count (bytes lost in a crash), rewind.
    async fn reconcile(&self, u: UploadRecord) -> Result<UploadRecord, ImageError> {
        let path = self.inner.dirs.staging(&u.id);
        let on_disk = blocking(move || blob::len(&path)).await.map_err(io_error)?;
        if on_disk >= u.received || self.inner.dirs.blob(&u.sha256).exists() {
            return Ok(u);
        }
        let (_guard, mut u) = self.lock_upload(&u.id).await?;
        u.received = self.rewind(&u).await?;
        Ok(u)
    }

    /// Set the upload's count to what its staging file holds; call with its lock held.
    async fn rewind(&self, u: &UploadRecord) -> Result<u64, ImageError> {
        let path = self.inner.dirs.staging(&u.id);
        let on_disk = blocking(move || blob::len(&path)).await.map_err(io_error)?.min(u.received);
        tracing::warn!(upload.id = %u.id, counted = u.received, on_disk, "staging file is short; upload rewound");
        self.db()?.set_received(&u.id, on_disk).await?;
        Ok(on_disk)
    }

    async fn sweep(&self) -> Result<(), ImageError> {
        let Ok(db) = self.db() else { return Ok(()) };
        let images: HashSet<String> = db.images().await?.into_iter().map(|i| i.sha256).collect();
        crate::metrics::images(images.len());
        let uploads = db.uploads().await?;
        let dirs = self.inner.dirs.clone();
        let (blobs, parts) = blocking(move || dirs.contents()).await.map_err(io_error)?;
        for sha in blobs.iter().filter(|b| !images.contains(*b) && !uploads.iter().any(|u| &u.sha256 == *b)) {
            tracing::info!(image.sha256 = %sha, "removing a blob no image owns");
            blob::remove(&self.inner.dirs.blob(sha)).map_err(io_error)?;
        }
        for id in parts.iter().filter(|p| !uploads.iter().any(|u| &u.id == *p)) {
            tracing::info!(upload.id = %id, "removing a staging file no upload owns");
            blob::remove(&self.inner.dirs.staging(id)).map_err(io_error)?;
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(format!("blocking task failed: {e}"))))
}

fn io_error(e: io::Error) -> ImageError {
    ImageError::Io(e.to_string())
}
