//! The bookkeeping of the piece cache, without I/O: which pieces are held on which level, how
//! many bytes each level uses, and the eviction order (LFU, least recently used among equals).
//! Invariant: an entry is in `mem_order` iff it has `mem`, in `disk_order` iff `on_disk`, and
//! every entry is on at least one level.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use tokio::time::Instant;

use crate::distribution::manifest::PieceHash;

/// (uses, last-use tick, hash): the first in order is the LFU victim, least recent among equals.
type Rank = (u64, u64, PieceHash);

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) len: u64,
    pub(super) uses: u64,
    pub(super) tick: u64,
    pub(super) last_used: Instant,
    pub(super) mem: Option<Bytes>,
    pub(super) on_disk: bool,
}

#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<PieceHash, Entry>,
    mem_order: BTreeSet<Rank>,
    disk_order: BTreeSet<Rank>,
    pub(super) mem_used: u64,
    pub(super) disk_used: u64,
    tick: u64,
}

impl Index {
    pub(super) fn add(&mut self, hash: PieceHash, mut e: Entry) {
        self.tick += 1;
        e.tick = self.tick;
        if e.on_disk {
            self.disk_order.insert((e.uses, e.tick, hash));
        }
        self.entries.insert(hash, e);
    }

    pub(super) fn touch(&mut self, hash: &PieceHash, now: Instant) -> Option<&Entry> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.get_mut(hash)?;
        let old = (e.uses, e.tick, *hash);
        e.uses += 1;
        e.tick = tick;
        e.last_used = now;
        let new = (e.uses, e.tick, *hash);
        if e.mem.is_some() {
            self.mem_order.remove(&old);
            self.mem_order.insert(new);
        }
        if e.on_disk {
            self.disk_order.remove(&old);
            self.disk_order.insert(new);
        }
        self.entries.get(hash)
    }

    pub(super) fn set_mem(&mut self, hash: &PieceHash, bytes: Bytes) {
        if let Some(e) = self.entries.get_mut(hash) {
            self.mem_used += e.len;
            self.mem_order.insert((e.uses, e.tick, *hash));
            e.mem = Some(bytes);
        }
    }

    pub(super) fn remove(&mut self, hash: &PieceHash) -> Option<Entry> {
        let e = self.entries.remove(hash)?;
        let rank = (e.uses, e.tick, *hash);
        if e.mem.is_some() {
            self.mem_order.remove(&rank);
            self.mem_used -= e.len;
        }
        if e.on_disk {
            self.disk_order.remove(&rank);
            self.disk_used -= e.len;
        }
        Some(e)
    }

    /// Evict from disk until `len` more bytes fit; the evicted pieces' files are the caller's to delete.
    pub(super) fn make_room_disk(&mut self, len: u64, budget: u64) -> Vec<PieceHash> {
        let mut victims = Vec::new();
        while self.disk_used + len > budget {
            let Some(rank) = self.disk_order.pop_first() else { break };
            let hash = rank.2;
            if let Some(e) = self.entries.get_mut(&hash) {
                e.on_disk = false;
                self.disk_used -= e.len;
                if e.mem.is_none() {
                    self.entries.remove(&hash);
                }
            }
            victims.push(hash);
        }
        victims
    }

    /// Evict from memory until `len` more bytes fit, but only pieces used at most `max_uses`
    /// times (when given); false, evicting nothing, if that is not enough.
    pub(super) fn make_room_mem(&mut self, len: u64, max_uses: Option<u64>, budget: u64) -> bool {
        let mut freed = 0;
        let mut chosen = Vec::new();
        for rank in &self.mem_order {
            if self.mem_used - freed + len <= budget {
                break;
            }
            if max_uses.is_some_and(|m| rank.0 > m) {
                return false;
            }
            freed += self.entries.get(&rank.2).map_or(0, |e| e.len);
            chosen.push(*rank);
        }
        if self.mem_used - freed + len > budget {
            return false;
        }
        for rank in chosen {
            self.mem_order.remove(&rank);
            if let Some(e) = self.entries.get_mut(&rank.2) {
                e.mem = None;
                self.mem_used -= e.len;
                if !e.on_disk {
                    self.entries.remove(&rank.2);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> PieceHash {
        PieceHash([n; 32])
    }

    fn disk(len: u64) -> Entry {
        Entry { len, uses: 1, tick: 0, last_used: Instant::now(), mem: None, on_disk: true }
    }

    /// Put `n` on disk the way the cache does: make room, reserve, add.
    fn store(ix: &mut Index, n: u8, len: u64, budget: u64) -> Vec<PieceHash> {
        let victims = ix.make_room_disk(len, budget);
        ix.disk_used += len;
        ix.add(h(n), disk(len));
        victims
    }

    fn check(ix: &Index) {
        let mem: u64 = ix.entries.values().filter(|e| e.mem.is_some()).map(|e| e.len).sum();
        let dsk: u64 = ix.entries.values().filter(|e| e.on_disk).map(|e| e.len).sum();
        assert_eq!((ix.mem_used, ix.disk_used), (mem, dsk));
        assert_eq!(ix.mem_order.len(), ix.entries.values().filter(|e| e.mem.is_some()).count());
        assert_eq!(ix.disk_order.len(), ix.entries.values().filter(|e| e.on_disk).count());
        assert!(ix.entries.values().all(|e| e.mem.is_some() || e.on_disk), "an entry on no level");
    }

    #[test]
    fn the_least_frequently_used_piece_goes_first() {
        let mut ix = Index::default();
        for n in 1..=3 {
            store(&mut ix, n, 10, 30);
        }
        let now = Instant::now();
        ix.touch(&h(1), now);
        ix.touch(&h(1), now);
        ix.touch(&h(3), now);
        assert_eq!(store(&mut ix, 4, 10, 30), vec![h(2)], "2 was used least");
        check(&ix);
        assert!(!ix.entries.contains_key(&h(2)));
    }

    #[test]
    fn among_equally_used_pieces_the_least_recent_goes_first() {
        let mut ix = Index::default();
        for n in 1..=3 {
            store(&mut ix, n, 10, 30);
        }
        let now = Instant::now();
        // All used twice; 2 most recently, then 1; 3 is the least recent.
        ix.touch(&h(3), now);
        ix.touch(&h(1), now);
        ix.touch(&h(2), now);
        assert_eq!(store(&mut ix, 4, 20, 30), vec![h(3), h(1)]);
        check(&ix);
    }

    #[test]
    fn memory_room_is_made_only_from_pieces_used_less() {
        let mut ix = Index::default();
        store(&mut ix, 1, 10, 100);
        store(&mut ix, 2, 10, 100);
        ix.set_mem(&h(1), Bytes::from_static(&[0; 10]));
        let now = Instant::now();
        for _ in 0..5 {
            ix.touch(&h(1), now);
        }
        // Memory budget 10, held by piece 1 (6 uses): piece 2 (1 use) may not push it out…
        assert!(!ix.make_room_mem(10, Some(1), 10));
        assert!(ix.entries[&h(1)].mem.is_some());
        // …but a piece used more may.
        assert!(ix.make_room_mem(10, Some(7), 10));
        assert!(ix.entries[&h(1)].mem.is_none() && ix.entries[&h(1)].on_disk, "dropped from memory, still on disk");
        check(&ix);
    }

    #[test]
    fn a_memory_only_piece_evicted_from_memory_is_gone() {
        let mut ix = Index::default();
        ix.add(h(1), Entry { on_disk: false, ..disk(10) });
        ix.set_mem(&h(1), Bytes::from_static(&[0; 10]));
        check(&ix);
        assert!(ix.make_room_mem(10, None, 10));
        assert!(ix.entries.is_empty());
        check(&ix);
    }

    #[test]
    fn a_piece_evicted_from_disk_stays_while_in_memory() {
        let mut ix = Index::default();
        store(&mut ix, 1, 10, 10);
        ix.set_mem(&h(1), Bytes::from_static(&[0; 10]));
        assert_eq!(store(&mut ix, 2, 10, 10), vec![h(1)]);
        assert!(ix.entries[&h(1)].mem.is_some());
        check(&ix);
        assert!(ix.remove(&h(1)).is_some());
        check(&ix);
        assert_eq!(ix.mem_used, 0);
    }
}
