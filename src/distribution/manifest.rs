//! Content-addressed image manifests. An image is cut into pieces of `piece_size` bytes (the
//! last may be shorter); each piece is named by the SHA-256 of its bytes and the whole file by its
//! own SHA-256, which is the image's id. The JSON is what the hive serves at
//! `GET /api/v1/images/{sha256}/manifest`. A node trusts a piece only if its bytes hash to the
//! manifest's entry for that index, whoever sent it; `validate` checks a manifest's shape once so
//! that every index below `piece_count()` has a well-formed hash and a range inside the file.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Piece size when nobody says otherwise ("pieces of a few MiB").
pub const DEFAULT_PIECE_SIZE: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("piece size must be at least 1 byte")]
    ZeroPieceSize,
    #[error("{field}: {value:?} is not a SHA-256 in hex (64 characters 0-9a-f)")]
    BadHash { field: String, value: String },
    #[error("{size} bytes in pieces of {piece_size} make {expected} pieces, the manifest lists {listed}")]
    PieceCount { size: u64, piece_size: u64, expected: u64, listed: usize },
    #[error("piece {index} does not exist (the image has {count} pieces)")]
    NoSuchPiece { index: usize, count: usize },
    #[error("piece {index} has {len} bytes, expected {expected}")]
    PieceLength { index: usize, len: u64, expected: u64 },
    #[error("piece {index} does not match its hash (expected {expected}, got {actual})")]
    PieceMismatch { index: usize, expected: PieceHash, actual: PieceHash },
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
}

/// A SHA-256 digest: a piece's name in the cache and on the wire (as lowercase hex).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PieceHash(pub [u8; 32]);

impl PieceHash {
    pub fn of(bytes: &[u8]) -> PieceHash {
        PieceHash(Sha256::digest(bytes).into())
    }

    /// Parse 64 hex digits (either case); `field` names the input in the error.
    pub fn parse(field: &str, hex_str: &str) -> Result<PieceHash, ManifestError> {
        let mut out = [0u8; 32];
        match hex::decode_to_slice(hex_str, &mut out) {
            Ok(()) => Ok(PieceHash(out)),
            Err(_) => Err(ManifestError::BadHash { field: field.to_string(), value: hex_str.chars().take(80).collect() }),
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PieceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form: enough to tell pieces apart in logs and test failures.
        write!(f, "PieceHash({}…)", &self.to_hex()[..12])
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// SHA-256 of the whole file, hex: the image's id.
    pub sha256: String,
    pub size: u64,
    pub piece_size: u64,
    /// SHA-256 of each piece, hex, in file order.
    pub pieces: Vec<String>,
}

impl Manifest {
    /// Hash `input` piece by piece, and as a whole, in one pass; memory use is one piece.
    pub fn from_reader(mut input: impl Read, piece_size: u64) -> Result<Manifest, ManifestError> {
        if piece_size == 0 {
            return Err(ManifestError::ZeroPieceSize);
        }
        let mut whole = Sha256::new();
        let mut pieces = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; piece_size.min(64 * 1024 * 1024) as usize];
        let mut piece = Sha256::new();
        let mut in_piece = 0u64;
        loop {
            let want = (piece_size - in_piece).min(buf.len() as u64) as usize;
            let n = match input.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            whole.update(&buf[..n]);
            piece.update(&buf[..n]);
            size += n as u64;
            in_piece += n as u64;
            if in_piece == piece_size {
                pieces.push(hex::encode(std::mem::take(&mut piece).finalize()));
                in_piece = 0;
            }
        }
        if in_piece > 0 {
            pieces.push(hex::encode(piece.finalize()));
        }
        Ok(Manifest { sha256: hex::encode(whole.finalize()), size, piece_size, pieces })
    }

    /// `from_reader` on a file. Blocking: call it from `spawn_blocking` in async code.
    pub fn from_file(path: &Path, piece_size: u64) -> Result<Manifest, ManifestError> {
        Manifest::from_reader(io::BufReader::with_capacity(1024 * 1024, File::open(path)?), piece_size)
    }

    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// Check the shape: hashes are hex SHA-256s and the piece list covers `size` exactly.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.piece_size == 0 {
            return Err(ManifestError::ZeroPieceSize);
        }
        PieceHash::parse("sha256", &self.sha256)?;
        let expected = self.size.div_ceil(self.piece_size);
        if expected != self.pieces.len() as u64 {
            return Err(ManifestError::PieceCount { size: self.size, piece_size: self.piece_size, expected, listed: self.pieces.len() });
        }
        self.piece_hashes().map(|_| ())
    }

    /// Every piece's hash, parsed.
    pub fn piece_hashes(&self) -> Result<Vec<PieceHash>, ManifestError> {
        self.pieces.iter().enumerate().map(|(i, h)| PieceHash::parse(&format!("pieces[{i}]"), h)).collect()
    }

    pub fn piece_hash(&self, index: usize) -> Result<PieceHash, ManifestError> {
        let h = self.pieces.get(index).ok_or(ManifestError::NoSuchPiece { index, count: self.pieces.len() })?;
        PieceHash::parse(&format!("pieces[{index}]"), h)
    }

    /// Byte range of piece `index` in the file.
    pub fn piece_range(&self, index: usize) -> Result<Range<u64>, ManifestError> {
        let no_such = ManifestError::NoSuchPiece { index, count: self.pieces.len() };
        if index >= self.pieces.len() || self.piece_size == 0 {
            return Err(no_such);
        }
        let start = (index as u64).checked_mul(self.piece_size).filter(|s| *s < self.size).ok_or(no_such)?;
        Ok(start..self.size.min(start + self.piece_size))
    }

    /// Ok when `bytes` are exactly piece `index`: the right length and the right hash.
    pub fn verify_piece(&self, index: usize, bytes: &[u8]) -> Result<(), ManifestError> {
        let range = self.piece_range(index)?;
        let expected_len = range.end - range.start;
        if bytes.len() as u64 != expected_len {
            return Err(ManifestError::PieceLength { index, len: bytes.len() as u64, expected: expected_len });
        }
        let expected = self.piece_hash(index)?;
        let actual = PieceHash::of(bytes);
        if actual != expected {
            return Err(ManifestError::PieceMismatch { index, expected, actual });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn pieces_and_whole_file_hashes_match_independent_hashing() {
        let d = data(10_000);
        let m = Manifest::from_reader(&d[..], 4096).unwrap();
        assert_eq!(m.size, 10_000);
        assert_eq!(m.sha256, hex::encode(Sha256::digest(&d)));
        let expected: Vec<String> = d.chunks(4096).map(|c| hex::encode(Sha256::digest(c))).collect();
        assert_eq!(m.pieces, expected);
        m.validate().unwrap();
    }

    #[test]
    fn a_reader_that_returns_short_reads_gives_the_same_manifest() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let d = data(5000);
        assert_eq!(Manifest::from_reader(Trickle(&d), 1000).unwrap(), Manifest::from_reader(&d[..], 1000).unwrap());
    }

    #[test]
    fn from_file_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let d = data(9000);
        std::fs::write(&path, &d).unwrap();
        assert_eq!(Manifest::from_file(&path, 4096).unwrap(), Manifest::from_reader(&d[..], 4096).unwrap());
    }

    #[test]
    fn ranges_cover_the_file_and_the_last_piece_is_short() {
        let m = Manifest::from_reader(&data(9)[..], 4).unwrap();
        assert_eq!(m.piece_count(), 3);
        assert_eq!(m.piece_range(0).unwrap(), 0..4);
        assert_eq!(m.piece_range(2).unwrap(), 8..9);
        assert!(matches!(m.piece_range(3), Err(ManifestError::NoSuchPiece { index: 3, count: 3 })));
        let empty = Manifest::from_reader(&[][..], 4).unwrap();
        assert_eq!(empty.piece_count(), 0);
        empty.validate().unwrap();
    }

    #[test]
    fn verify_piece_rejects_wrong_bytes_and_wrong_lengths() {
        let d = data(9);
        let m = Manifest::from_reader(&d[..], 4).unwrap();
        m.verify_piece(1, &d[4..8]).unwrap();
        m.verify_piece(2, &d[8..]).unwrap();
        let mut bad = d[4..8].to_vec();
        bad[0] ^= 1;
        assert!(matches!(m.verify_piece(1, &bad), Err(ManifestError::PieceMismatch { index: 1, .. })));
        assert!(matches!(m.verify_piece(1, &d[4..7]), Err(ManifestError::PieceLength { index: 1, len: 3, expected: 4 })));
        assert!(matches!(m.verify_piece(9, &d[..4]), Err(ManifestError::NoSuchPiece { .. })));
    }

    #[test]
    fn json_shape_is_the_hives() {
        let m = Manifest::from_reader(&data(5)[..], 4).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["size"], 5);
        assert_eq!(v["piece_size"], 4);
        assert_eq!(v["pieces"].as_array().unwrap().len(), 2);
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let good = Manifest::from_reader(&data(9)[..], 4).unwrap();
        let mut m = good.clone();
        m.pieces.pop();
        assert!(matches!(m.validate(), Err(ManifestError::PieceCount { expected: 3, listed: 2, .. })));
        let mut m = good.clone();
        m.pieces[1] = "zz".into();
        assert!(matches!(m.validate(), Err(ManifestError::BadHash { ref field, .. }) if field == "pieces[1]"));
        let mut m = good.clone();
        m.sha256 = "abc".into();
        assert!(matches!(m.validate(), Err(ManifestError::BadHash { ref field, .. }) if field == "sha256"));
        let mut m = good;
        m.piece_size = 0;
        assert!(matches!(m.validate(), Err(ManifestError::ZeroPieceSize)));
    }
}
