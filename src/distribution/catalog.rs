//! What a node tells its peers: the images it knows (their manifests) and, for each, which pieces
//! it holds (asked of the cache at the moment of the question, so eviction shows at once) and
//! which it is fetching right now. "Pending" lets nodes avoid pulling the same fresh piece from
//! the origin twice: a piece someone is already fetching will soon be held by a peer.
//! On the wire a `Have` is `{"pieces": n, "held": hex, "pending": hex}`, the hex being a bitmap,
//! most significant bit first (piece 0 is 0x80 of the first byte).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::cache::PieceCache;
use super::manifest::{Manifest, ManifestError, PieceHash};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("have: {0}")]
    BadHave(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    len: usize,
    bits: Vec<u8>,
}

impl Bitmap {
    pub fn new(len: usize) -> Bitmap {
        Bitmap { len, bits: vec![0; len.div_ceil(8)] }
    }

    pub fn full(len: usize) -> Bitmap {
        let mut b = Bitmap::new(len);
        (0..len).for_each(|i| b.set(i, true));
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// False past the end.
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bits[i / 8] & (0x80 >> (i % 8)) != 0
    }

    /// Ignored past the end.
    pub fn set(&mut self, i: usize, on: bool) {
        if i < self.len {
            if on {
                self.bits[i / 8] |= 0x80 >> (i % 8);
            } else {
                self.bits[i / 8] &= !(0x80 >> (i % 8));
            }
        }
    }

    pub fn count_ones(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.bits)
    }

    /// Parse a bitmap of `len` bits; bits set past `len` are refused.
    pub fn from_hex(len: usize, s: &str) -> Result<Bitmap, CatalogError> {
        let bits = hex::decode(s).map_err(|e| CatalogError::BadHave(format!("not hex: {e}")))?;
        if bits.len() != len.div_ceil(8) {
            return Err(CatalogError::BadHave(format!("{} bytes for {len} pieces", bits.len())));
        }
        let b = Bitmap { len, bits };
        if b.count_ones() != (0..len).filter(|i| b.get(*i)).count() {
            return Err(CatalogError::BadHave("bits set past the last piece".into()));
        }
        Ok(b)
    }
}

/// A peer's answer to `GET /pieces/{image}/have`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Have {
    pub pieces: usize,
    pub held: String,
    pub pending: String,
}

impl Have {
    pub fn new(held: &Bitmap, pending: &Bitmap) -> Have {
        Have { pieces: held.len(), held: held.to_hex(), pending: pending.to_hex() }
    }

    /// (held, pending), checked against the piece count the asker expects.
    pub fn bitmaps(&self, expected_pieces: usize) -> Result<(Bitmap, Bitmap), CatalogError> {
        if self.pieces != expected_pieces {
            return Err(CatalogError::BadHave(format!("{} pieces, the manifest has {expected_pieces}", self.pieces)));
        }
        Ok((Bitmap::from_hex(self.pieces, &self.held)?, Bitmap::from_hex(self.pieces, &self.pending)?))
    }
}

/// One known image: its manifest, the parsed piece hashes, and the pieces being fetched.
#[derive(Debug)]
pub struct CatalogEntry {
    manifest: Manifest,
    hashes: Vec<PieceHash>,
    pending: Mutex<Bitmap>,
}

impl CatalogEntry {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn hashes(&self) -> &[PieceHash] {
        &self.hashes
    }

    /// Mark piece `i` as being fetched (or no longer). One fetch per image per node at a time.
    pub fn set_pending(&self, i: usize, on: bool) {
        self.pending.lock().set(i, on);
    }

    pub fn have(&self, cache: &PieceCache) -> Have {
        let mut held = Bitmap::new(self.hashes.len());
        for (i, h) in cache.holds(&self.hashes).into_iter().enumerate() {
            held.set(i, h);
        }
        Have::new(&held, &self.pending.lock())
    }
}

/// The images a node can answer for; cloneable, shared by the fetcher and the piece server.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    images: Arc<RwLock<HashMap<String, Arc<CatalogEntry>>>>,
}

impl Catalog {
    /// Know `manifest` (checked first). The same manifest again returns the existing entry.
    pub fn add(&self, manifest: Manifest) -> Result<Arc<CatalogEntry>, ManifestError> {
        manifest.validate()?;
        let mut images = self.images.write();
        if let Some(e) = images.get(&manifest.sha256).filter(|e| e.manifest == manifest) {
            return Ok(e.clone());
        }
        let hashes = manifest.piece_hashes()?;
        let pending = Mutex::new(Bitmap::new(hashes.len()));
        let entry = Arc::new(CatalogEntry { manifest, hashes, pending });
        images.insert(entry.manifest.sha256.clone(), entry.clone());
        Ok(entry)
    }

    pub fn get(&self, image: &str) -> Option<Arc<CatalogEntry>> {
        self.images.read().get(image).cloned()
    }

    pub fn remove(&self, image: &str) -> bool {
        self.images.write().remove(image).is_some()
    }

    pub fn images(&self) -> Vec<String> {
        self.images.read().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::cache::CacheConfig;

    #[test]
    fn bitmaps_round_trip_through_hex_msb_first() {
        let mut b = Bitmap::new(10);
        b.set(0, true);
        b.set(9, true);
        b.set(10, true); // past the end: ignored
        assert_eq!(b.to_hex(), "8040");
        assert_eq!(b.count_ones(), 2);
        assert!(b.get(9) && !b.get(1) && !b.get(10));
        assert_eq!(Bitmap::from_hex(10, "8040").unwrap(), b);
        b.set(0, false);
        assert_eq!(b.to_hex(), "0040");
        assert!(Bitmap::full(10).is_full() && !b.is_full());
    }

    #[test]
    fn bad_bitmaps_are_refused() {
        assert!(Bitmap::from_hex(10, "zz40").is_err());
        assert!(Bitmap::from_hex(10, "80").is_err(), "too short");
        assert!(Bitmap::from_hex(10, "8060").is_err(), "bit 10 set");
        let have = Have::new(&Bitmap::new(3), &Bitmap::new(3));
        assert!(have.bitmaps(4).is_err(), "piece count differs from the manifest");
        assert_eq!(have.bitmaps(3).unwrap().0, Bitmap::new(3));
    }

    #[tokio::test]
    async fn have_reports_held_and_pending_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(CacheConfig::new(dir.path())).await.unwrap();
        let data: Vec<u8> = (0..30u8).collect();
        let m = Manifest::from_reader(&data[..], 10).unwrap();
        let catalog = Catalog::default();
        let entry = catalog.add(m.clone()).unwrap();
        assert!(Arc::ptr_eq(&entry, &catalog.add(m.clone()).unwrap()), "same manifest, same entry");
        cache.insert(entry.hashes()[1], bytes::Bytes::copy_from_slice(&data[10..20])).await.unwrap();
        entry.set_pending(2, true);
        let have = catalog.get(&m.sha256).unwrap().have(&cache);
        let (held, pending) = have.bitmaps(3).unwrap();
        assert_eq!((held.get(0), held.get(1), held.get(2)), (false, true, false));
        assert_eq!((pending.get(1), pending.get(2)), (false, true));
        assert_eq!(catalog.images(), vec![m.sha256.clone()]);
        assert!(catalog.remove(&m.sha256) && catalog.get(&m.sha256).is_none());
    }

    #[test]
    fn a_bad_manifest_is_not_added() {
        let mut m = Manifest::from_reader(&[1u8, 2, 3][..], 2).unwrap();
        m.pieces.pop();
        let catalog = Catalog::default();
        assert!(catalog.add(m).is_err());
        assert!(catalog.images().is_empty());
    }
}
