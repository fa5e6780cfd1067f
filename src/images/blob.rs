//! Image files on the hive's disk: staging files `images/uploads/<id>.part` and final blobs
//! `images/blobs/<sha256>`, plus the pure arithmetic of pieces and the hashing that builds a
//! manifest. Everything here is blocking I/O; the registry runs it on the blocking pool.
//!
//! Guarantees: a chunk is fsynced (and a new staging file's directory entry too) before
//! `write_at` returns; a blob appears under its final name only by `rename` from a staging
//! file whose content has been verified, and the rename is fsynced before `publish` returns.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub const MIB: u64 = 1024 * 1024;

/// The two directories under `data_dir/images`.
#[derive(Clone, Debug)]
pub struct Dirs {
    blobs: PathBuf,
    uploads: PathBuf,
}

impl Dirs {
    pub fn create(data_dir: &Path) -> io::Result<Dirs> {
        let root = data_dir.join("images");
        let dirs = Dirs { blobs: root.join("blobs"), uploads: root.join("uploads") };
        std::fs::create_dir_all(&dirs.blobs)?;
        std::fs::create_dir_all(&dirs.uploads)?;
        Ok(dirs)
    }

    /// Callers pass ids and hashes that were validated as hex, so no path can escape.
    pub fn staging(&self, upload_id: &str) -> PathBuf {
        self.uploads.join(format!("{upload_id}.part"))
    }

    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// Names of the files in the blob directory, and upload ids of the staging files.
    pub fn contents(&self) -> io::Result<(Vec<String>, Vec<String>)> {
        let names = |dir: &Path| -> io::Result<Vec<String>> {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(dir)? {
                out.extend(entry?.file_name().to_str().map(str::to_string));
            }
            Ok(out)
        };
        let uploads = names(&self.uploads)?.into_iter().filter_map(|n| n.strip_suffix(".part").map(str::to_string)).collect();
        Ok((names(&self.blobs)?, uploads))
    }
}

/// Number of pieces of a blob of `size` bytes (at least one for a non-empty blob).
pub fn piece_count(size: u64, piece_size: u64) -> u64 {
    size.div_ceil(piece_size)
}

/// Byte range `(start, len)` of piece `index`, or `None` past the last piece.
pub fn piece_range(size: u64, piece_size: u64, index: u64) -> Option<(u64, u64)> {
    let start = index.checked_mul(piece_size).filter(|s| *s < size)?;
    Some((start, piece_size.min(size - start)))
}

/// SHA-256 of the first `size` bytes of `input` and of each `piece_size` piece of them, in hex.
/// Fails with `UnexpectedEof` if `input` is shorter than `size`.
pub fn digest(mut input: impl Read, size: u64, piece_size: u64, mut progress: impl FnMut(u64)) -> io::Result<(String, Vec<String>)> {
    let mut whole = Sha256::new();
    let mut piece = Sha256::new();
    let mut pieces = Vec::with_capacity(piece_count(size, piece_size) as usize);
    let mut buf = vec![0u8; MIB as usize];
    let (mut done, mut in_piece) = (0u64, 0u64);
    while done < size {
        let want = (size - done).min(piece_size - in_piece).min(buf.len() as u64) as usize;
        let n = input.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{done} of {size} bytes present")));
        }
        whole.update(&buf[..n]);
        piece.update(&buf[..n]);
        done += n as u64;
        in_piece += n as u64;
        if in_piece == piece_size || done == size {
            pieces.push(hex::encode(std::mem::take(&mut piece).finalize()));
            in_piece = 0;
        }
        progress(n as u64);
    }
    Ok((hex::encode(whole.finalize()), pieces))
}

/// Write `data` at `offset` of the staging file, dropping anything after `offset` first (a
/// chunk that was written but never acknowledged), and fsync. Fails if the file is shorter than
/// `offset`: those bytes are lost and the caller must rewind.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let created = !path.exists();
    let mut f = OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    let len = f.metadata()?.len();
    if len < offset {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("staging file holds {len} bytes, expected {offset}")));
    }
    if len > offset {
        f.set_len(offset)?;
    }
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.sync_all()?;
    if created {
        sync_parent(path)?;
    }
    Ok(())
}

/// Length of the file at `path`, 0 if it does not exist.
pub fn len(path: &Path) -> io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Hash the first `size` bytes of `path` (see `digest`).
pub fn digest_file(path: &Path, size: u64, piece_size: u64) -> io::Result<(String, Vec<String>)> {
    digest(io::BufReader::with_capacity(MIB as usize, File::open(path)?), size, piece_size, |_| {})
}

/// Cut `staging` to `size` bytes and move it to `blob`, durably.
pub fn publish(staging: &Path, size: u64, blob: &Path) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(staging)?;
    if f.metadata()?.len() > size {
        f.set_len(size)?;
        f.sync_all()?;
    }
    std::fs::rename(staging, blob)?;
    sync_parent(blob)
}

pub fn read_range(path: &Path, start: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(start))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Remove a file; one that is already gone is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A new or renamed file survives a crash only once its directory entry is on disk.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn pieces_cover_the_blob_exactly_once() {
        assert_eq!(piece_count(1, 4), 1);
        assert_eq!(piece_count(8, 4), 2);
        assert_eq!(piece_count(9, 4), 3);
        assert_eq!(piece_range(9, 4, 0), Some((0, 4)));
        assert_eq!(piece_range(9, 4, 2), Some((8, 1)), "the last piece is short");
        assert_eq!(piece_range(9, 4, 3), None);
        assert_eq!(piece_range(8, 4, 2), None);
        assert_eq!(piece_range(8, 4, u64::MAX), None, "no overflow on absurd indexes");
    }

    #[test]
    fn digest_hashes_the_whole_and_each_piece() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut seen = 0;
        let (whole, pieces) = digest(&data[..], data.len() as u64, 4096, |n| seen += n).unwrap();
        assert_eq!(whole, sha(&data));
        assert_eq!(pieces, vec![sha(&data[..4096]), sha(&data[4096..8192]), sha(&data[8192..])]);
        assert_eq!(seen, data.len() as u64);
        // Only the first `size` bytes count; a short input is an error, not a wrong hash.
        let (head, _) = digest(&data[..], 100, 4096, |_| {}).unwrap();
        assert_eq!(head, sha(&data[..100]));
        assert_eq!(digest(&data[..50], 100, 4096, |_| {}).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn digest_with_pieces_larger_than_the_read_buffer() {
        let data = vec![3u8; (MIB + MIB / 2) as usize];
        let (whole, pieces) = digest(&data[..], data.len() as u64, 2 * MIB, |_| {}).unwrap();
        assert_eq!(whole, sha(&data));
        assert_eq!(pieces, vec![sha(&data)]);
    }

    #[test]
    fn write_at_drops_unacknowledged_bytes_and_refuses_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.part");
        write_at(&p, 0, b"hello").unwrap();
        write_at(&p, 5, b" wor").unwrap();
        write_at(&p, 5, b" world").unwrap(); // the client resent the chunk
        assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
        write_at(&p, 2, b"LLO").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"heLLO");
        assert!(write_at(&p, 99, b"x").is_err());
        assert_eq!(len(&p).unwrap(), 5);
        assert_eq!(len(&dir.path().join("missing")).unwrap(), 0);

        let blob = dir.path().join("blob");
        publish(&p, 3, &blob).unwrap();
        assert!(!p.exists());
        assert_eq!(std::fs::read(&blob).unwrap(), b"heL");
        assert_eq!(read_range(&blob, 1, 2).unwrap(), b"eL");
        remove(&blob).unwrap();
        remove(&blob).unwrap();
    }
}
