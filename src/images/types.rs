//! What the image registry takes and gives: the upload request and its validation, the views
//! the HTTP API returns, and `ImageError`. Validation is pure; a refused request names the
//! field that was wrong and has changed nothing.

use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::store::images::{ImageRecord, Requirements, UploadRecord};

/// Longest image name, in characters (a migration names its image, so it keeps to this too).
pub const NAME_MAX_CHARS: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("image {0} already exists")]
    Exists(String),
    #[error("an upload of {sha256} with size {size} exists; this request says size {asked}")]
    UploadMismatch { sha256: String, size: u64, asked: u64 },
    #[error("no upload {0}")]
    UnknownUpload(String),
    #[error("no image {0}")]
    UnknownImage(String),
    #[error("image {sha256} has {count} piece(s); there is no piece {index}")]
    UnknownPiece { sha256: String, index: u64, count: u64 },
    #[error("offset {given} is not where the upload stands; expected offset {expected}")]
    OffsetMismatch { expected: u64, given: u64 },
    #[error("chunk is larger than the limit of {max} bytes (images.chunk_mb)")]
    ChunkTooLarge { max: u64 },
    #[error("upload holds {offset} of {size} bytes; send the rest first")]
    Incomplete { offset: u64, size: u64 },
    #[error("the content's SHA-256 is {actual}, not {expected}; the upload was discarded")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("image storage: {0}")]
    Io(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this store does not hold images")]
    NoImageStore,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ImageError {
    ImageError::Invalid { field, reason: reason.into() }
}

/// `POST /api/v1/images/uploads`: what is about to be uploaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadSpec {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readme: Option<String>,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

impl UploadSpec {
    /// The first problem, naming its field; `max_size` in bytes.
    pub fn validate(&self, max_size: u64) -> Result<(), ImageError> {
        let chars = self.name.chars().count();
        if self.name.trim().is_empty() || chars > NAME_MAX_CHARS {
            return Err(invalid("name", format!("must be 1 to {NAME_MAX_CHARS} characters, not blank (got {chars})")));
        }
        if self.name.chars().any(char::is_control) {
            return Err(invalid("name", "must not contain control characters"));
        }
        check_sha256(&self.sha256)?;
        if self.size == 0 {
            return Err(invalid("size", "must be above 0"));
        }
        if self.size > max_size {
            return Err(invalid("size", format!("{} bytes is above the limit of {max_size} bytes (images.max_size_mb)", self.size)));
        }
        for (field, v) in [("cores", u64::from(self.cores)), ("ram_mb", self.ram_mb), ("disk_mb", self.disk_mb)] {
            if v == 0 {
                return Err(invalid(field, "must be above 0"));
            }
        }
        Ok(())
    }

    pub fn requirements(&self) -> Requirements {
        Requirements { cores: self.cores, ram_mb: self.ram_mb, disk_mb: self.disk_mb }
    }
}

pub fn check_sha256(s: &str) -> Result<(), ImageError> {
    if is_lower_hex(s, 64) { Ok(()) } else { Err(invalid("sha256", "must be 64 lowercase hexadecimal digits")) }
}

/// Upload ids are 32 lowercase hex digits (`new_upload_id`); they also name staging files.
pub fn check_upload_id(s: &str) -> Result<(), ImageError> {
    if is_lower_hex(s, 32) { Ok(()) } else { Err(invalid("upload_id", "must be 32 lowercase hexadecimal digits")) }
}

pub fn new_upload_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadView {
    pub upload_id: String,
    pub sha256: String,
    pub name: String,
    pub size: u64,
    /// Bytes received and on disk: the next PATCH starts here.
    pub offset: u64,
    /// Largest body one PATCH may carry.
    pub chunk_max: u64,
}

impl UploadView {
    pub fn of(u: &UploadRecord, chunk_max: u64) -> UploadView {
        UploadView { upload_id: u.id.clone(), sha256: u.sha256.clone(), name: u.name.clone(), size: u.size, offset: u.received, chunk_max }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    pub sha256: String,
    pub name: String,
    pub readme: String,
    pub cores: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
    pub size: u64,
    pub piece_size: u64,
    /// Number of pieces (the hashes are in the manifest).
    pub pieces: u64,
    pub created_at: u64,
}

impl From<&ImageRecord> for ImageView {
    fn from(i: &ImageRecord) -> Self {
        ImageView {
            sha256: i.sha256.clone(),
            name: i.name.clone(),
            readme: i.readme.clone(),
            cores: i.requirements.cores,
            ram_mb: i.requirements.ram_mb,
            disk_mb: i.requirements.disk_mb,
            size: i.size,
            piece_size: i.piece_size,
            pieces: super::blob::piece_count(i.size, i.piece_size),
            created_at: i.created_at,
        }
    }
}

/// What a node needs to fetch an image piece by piece and check each piece: the same type the
/// nodes' fetcher reads.
pub use crate::distribution::Manifest;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UploadSpec {
        UploadSpec { name: "debian-12".into(), sha256: "ab".repeat(32), size: 10, readme: None, cores: 1, ram_mb: 512, disk_mb: 1024 }
    }

    fn refused_field(s: UploadSpec) -> &'static str {
        match s.validate(100) {
            Err(ImageError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_good_spec_passes_and_each_bad_field_is_named() {
        spec().validate(100).unwrap();
        UploadSpec { size: 100, name: "é".repeat(80), ..spec() }.validate(100).unwrap();
        assert_eq!(refused_field(UploadSpec { name: String::new(), ..spec() }), "name");
        assert_eq!(refused_field(UploadSpec { name: "  ".into(), ..spec() }), "name");
        assert_eq!(refused_field(UploadSpec { name: "x".repeat(81), ..spec() }), "name");
        assert_eq!(refused_field(UploadSpec { name: "a\nb".into(), ..spec() }), "name");
        assert_eq!(refused_field(UploadSpec { sha256: "AB".repeat(32), ..spec() }), "sha256");
        assert_eq!(refused_field(UploadSpec { sha256: "ab".repeat(31), ..spec() }), "sha256");
        assert_eq!(refused_field(UploadSpec { sha256: "zz".repeat(32), ..spec() }), "sha256");
        assert_eq!(refused_field(UploadSpec { size: 0, ..spec() }), "size");
        assert_eq!(refused_field(UploadSpec { size: 101, ..spec() }), "size");
        assert_eq!(refused_field(UploadSpec { cores: 0, ..spec() }), "cores");
        assert_eq!(refused_field(UploadSpec { ram_mb: 0, ..spec() }), "ram_mb");
        assert_eq!(refused_field(UploadSpec { disk_mb: 0, ..spec() }), "disk_mb");
    }

    #[test]
    fn upload_ids_are_hex_and_checked() {
        let id = new_upload_id();
        check_upload_id(&id).unwrap();
        assert_ne!(id, new_upload_id());
        assert!(check_upload_id("../../etc/passwd").is_err());
        assert!(check_upload_id(&id.to_uppercase()).is_err());
    }
}
