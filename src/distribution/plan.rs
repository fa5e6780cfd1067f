//! The fetcher's choices, without I/O: which piece to fetch next and from where. Local pieces
//! first; then one (or `origin_concurrency`) origin fetch of a fresh piece, one that no peer holds
//! or is fetching; then the rarest piece held by peers, from a random holder with spare capacity.
//! The origin's work is striped: with nodes ranked by id, node k of n takes the fresh pieces
//! k, k+n, k+2n… front to back, then steals fresh pieces from the other stripes, back to front,
//! so nodes rarely pull the same piece from the origin even on a stale view of each other, and
//! the origin sends each piece about once. The origin serves anything else only as the last
//! resort, which the fetcher allows after it has been idle for a while. Peers that send a bad
//! piece are not asked for that piece again and are dropped after `BAN_AFTER_CORRUPT` bad pieces
//! or `BAN_AFTER_ERRORS` failures in a row.

use rand::Rng;

use super::catalog::Bitmap;

const BAN_AFTER_CORRUPT: u32 = 2;
const BAN_AFTER_ERRORS: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    Local,
    Peer(usize),
    Origin,
}

/// Why a piece fetch failed, as far as the plan cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Was believed held here but is not (evicted meanwhile).
    NotLocal,
    /// The source says it does not hold the piece.
    NotHeld,
    /// The bytes did not match the piece's hash.
    Corrupt,
    /// Transport error, timeout, bad status.
    Other,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Pieces in flight from peers (or read locally).
    pub concurrency: usize,
    pub per_peer: usize,
    /// Fresh pieces in flight from the origin, on top of `concurrency`; without peers the
    /// origin has `concurrency` slots instead.
    pub origin_concurrency: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Needed,
    InFlight,
    Done,
}

#[derive(Debug)]
struct Peer {
    held: Option<Bitmap>,
    pending: Option<Bitmap>,
    busy: usize,
    corrupt: u32,
    errors_in_a_row: u32,
    banned: bool,
}

#[derive(Debug)]
pub struct Plan {
    limits: Limits,
    state: Vec<State>,
    attempts: Vec<u32>,
    /// Per piece: peers (not banned) holding it / fetching it, by their last have list.
    avail: Vec<u32>,
    fetching: Vec<u32>,
    /// Per piece: peers not to ask for it again.
    failed: Vec<Vec<usize>>,
    local: Vec<usize>,
    peers: Vec<Peer>,
    origin_busy: usize,
    /// This node's stripe of the origin's work: (rank, nodes).
    stripe: (usize, usize),
    in_flight: usize,
    done: usize,
}

impl Plan {
    pub fn new(pieces: usize, peers: usize, local: Vec<usize>, limits: Limits) -> Plan {
        let peer = || Peer { held: None, pending: None, busy: 0, corrupt: 0, errors_in_a_row: 0, banned: false };
        Plan {
            limits,
            state: vec![State::Needed; pieces],
            attempts: vec![0; pieces],
            avail: vec![0; pieces],
            fetching: vec![0; pieces],
            failed: vec![Vec::new(); pieces],
            local,
            peers: (0..peers).map(|_| peer()).collect(),
            origin_busy: 0,
            stripe: (0, 1),
            in_flight: 0,
            done: 0,
        }
    }

    /// Take the origin's pieces `rank`, `rank + nodes`, … first (`rank < nodes`).
    pub fn with_stripe(mut self, rank: usize, nodes: usize) -> Plan {
        self.stripe = (rank % nodes.max(1), nodes.max(1));
        self
    }

    pub fn is_complete(&self) -> bool {
        self.done == self.state.len()
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.in_flight
    }

    #[cfg(test)]
    fn is_banned(&self, peer: usize) -> bool {
        self.peers[peer].banned
    }

    /// A peer's latest have list (pieces held and being fetched).
    pub fn update_have(&mut self, peer: usize, held: Bitmap, pending: Bitmap) {
        if self.peers[peer].banned {
            return;
        }
        self.count_peer(peer, false);
        self.peers[peer].held = Some(held);
        self.peers[peer].pending = Some(pending);
        self.count_peer(peer, true);
    }

    /// The next piece to fetch and its source, marked in flight; `None` when nothing should start
    /// now. `last_resort`: with nothing in flight, take any needed piece from the origin.
    pub fn next(&mut self, rng: &mut impl Rng, last_resort: bool) -> Option<(usize, From)> {
        // Origin fetches have their own slots: peers busy with every other slot must not stop
        // the origin from injecting fresh pieces.
        let room = self.in_flight - self.origin_busy < self.limits.concurrency;
        while room && let Some(i) = self.local.pop() {
            if self.state[i] == State::Needed {
                return Some(self.take(i, From::Local));
            }
        }
        let no_peers = self.peers.iter().all(|p| p.banned);
        let origin_cap = if no_peers {
            self.limits.concurrency.saturating_sub(self.in_flight - self.origin_busy)
        } else {
            self.limits.origin_concurrency
        };
        if self.origin_busy < origin_cap {
            let (rank, of) = self.stripe;
            let n = self.state.len();
            let fresh = |i: &usize| self.state[*i] == State::Needed && self.fetching[*i] == 0 && !self.has_holder(*i);
            // Own stripe front to back; then the other stripes in rank order, each back to front,
            // away from where its owner is working and from where other thieves start.
            let own = (rank..n).step_by(of).find(fresh);
            if let Some(i) = own.or_else(|| (1..of).flat_map(|j| ((rank + j) % of..n).step_by(of).rev()).find(fresh)) {
                return Some(self.take(i, From::Origin));
            }
        }
        if room && let Some(i) = self.rarest(rng) {
            let holders: Vec<usize> = self.usable_holders(i).collect();
            let p = holders[rng.random_range(0..holders.len())];
            return Some(self.take(i, From::Peer(p)));
        }
        if last_resort && self.in_flight == 0 {
            let start = rng.random_range(0..self.state.len().max(1));
            let n = self.state.len();
            if let Some(i) = (start..n).chain(0..start).find(|&i| self.state[i] == State::Needed) {
                return Some(self.take(i, From::Origin));
            }
        }
        None
    }

    pub fn done(&mut self, piece: usize, from: From) {
        self.release(piece, from);
        self.state[piece] = State::Done;
        self.done += 1;
        if let From::Peer(p) = from {
            self.peers[p].errors_in_a_row = 0;
        }
    }

    /// The fetch of `piece` from `from` failed; the piece is needed again. Returns the piece's
    /// failed attempts so far (a piece that was simply not held locally does not count).
    pub fn failed(&mut self, piece: usize, from: From, why: Failure) -> u32 {
        self.release(piece, from);
        if why != Failure::NotLocal {
            self.attempts[piece] += 1;
        }
        if let From::Peer(p) = from {
            match why {
                Failure::NotHeld => {
                    if let Some(held) = self.peers[p].held.as_mut().filter(|h| h.get(piece)) {
                        held.set(piece, false);
                        if !self.peers[p].banned {
                            self.avail[piece] -= 1;
                        }
                    }
                }
                Failure::Corrupt => {
                    self.failed[piece].push(p);
                    self.peers[p].corrupt += 1;
                    if self.peers[p].corrupt >= BAN_AFTER_CORRUPT {
                        self.ban(p);
                    }
                }
                Failure::Other => {
                    self.failed[piece].push(p);
                    self.peers[p].errors_in_a_row += 1;
                    if self.peers[p].errors_in_a_row >= BAN_AFTER_ERRORS {
                        self.ban(p);
                    }
                }
                Failure::NotLocal => {}
            }
        }
        self.attempts[piece]
    }

    fn take(&mut self, i: usize, from: From) -> (usize, From) {
        self.state[i] = State::InFlight;
        self.in_flight += 1;
        match from {
            From::Peer(p) => self.peers[p].busy += 1,
            From::Origin => self.origin_busy += 1,
            From::Local => {}
        }
        (i, from)
    }

    fn release(&mut self, piece: usize, from: From) {
        self.state[piece] = State::Needed;
        self.in_flight -= 1;
        match from {
            From::Peer(p) => self.peers[p].busy -= 1,
            From::Origin => self.origin_busy -= 1,
            From::Local => {}
        }
    }

    fn ban(&mut self, p: usize) {
        if !self.peers[p].banned {
            self.count_peer(p, false);
            self.peers[p].banned = true;
        }
    }

    /// Add (or remove) a peer's have list to (from) the per-piece counts.
    fn count_peer(&mut self, p: usize, add: bool) {
        let peer = &self.peers[p];
        for (bits, counts) in [(&peer.held, &mut self.avail), (&peer.pending, &mut self.fetching)] {
            let Some(bits) = bits else { continue };
            for (i, c) in counts.iter_mut().enumerate() {
                if bits.get(i) {
                    *c = if add { *c + 1 } else { *c - 1 };
                }
            }
        }
    }

    /// A peer that could still be asked for piece `i`, busy or not.
    fn has_holder(&self, i: usize) -> bool {
        self.avail[i] > 0 && self.peers.iter().enumerate().any(|(p, peer)| self.holds(p, peer, i))
    }

    /// Holders of piece `i` that may be asked for it now.
    fn usable_holders(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let per_peer = self.limits.per_peer;
        self.peers.iter().enumerate().filter(move |(p, peer)| peer.busy < per_peer && self.holds(*p, peer, i)).map(|(p, _)| p)
    }

    fn holds(&self, p: usize, peer: &Peer, i: usize) -> bool {
        !peer.banned && peer.held.as_ref().is_some_and(|h| h.get(i)) && !self.failed[i].contains(&p)
    }

    /// The needed piece held by the fewest peers among those some peer can send now, scanning
    /// from a random place so that ties are broken at random; one holder cannot be beaten.
    fn rarest(&self, rng: &mut impl Rng) -> Option<usize> {
        let n = self.state.len();
        if n == 0 {
            return None;
        }
        let start = rng.random_range(0..n);
        let mut best: Option<(u32, usize)> = None;
        for i in (start..n).chain(0..start) {
            let a = self.avail[i];
            if self.state[i] != State::Needed || a == 0 || best.is_some_and(|(b, _)| a >= b) {
                continue;
            }
            if self.usable_holders(i).next().is_some() {
                best = Some((a, i));
                if a == 1 {
                    break;
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn limits(concurrency: usize, per_peer: usize, origin: usize) -> Limits {
        Limits { concurrency, per_peer, origin_concurrency: origin }
    }

    fn bits(len: usize, on: &[usize]) -> Bitmap {
        let mut b = Bitmap::new(len);
        on.iter().for_each(|i| b.set(*i, true));
        b
    }

    #[test]
    fn local_pieces_come_first() {
        let mut plan = Plan::new(3, 0, vec![2], limits(4, 2, 1));
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(plan.next(&mut rng, false), Some((2, From::Local)));
        plan.done(2, From::Local);
        assert!(!plan.is_complete());
    }

    #[test]
    fn the_origin_gets_fresh_pieces_and_peers_the_rarest() {
        let mut plan = Plan::new(4, 2, vec![], limits(10, 10, 1));
        plan.update_have(0, bits(4, &[0, 1]), bits(4, &[]));
        plan.update_have(1, bits(4, &[1]), bits(4, &[2]));
        let mut rng = StdRng::seed_from_u64(7);
        // 3: nobody holds or fetches it. 2 is being fetched by peer 1: not from the origin.
        assert_eq!(plan.next(&mut rng, false), Some((3, From::Origin)));
        assert_eq!(plan.next(&mut rng, false), Some((0, From::Peer(0))), "0 is rarer than 1");
        assert!(matches!(plan.next(&mut rng, false), Some((1, From::Peer(_)))));
        assert_eq!(plan.next(&mut rng, false), None, "2 will come from peer 1; the origin slot is taken");
        assert_eq!(plan.in_flight(), 3);
    }

    #[test]
    fn the_origin_is_the_last_resort_for_pieces_others_are_fetching() {
        let mut plan = Plan::new(2, 1, vec![], limits(4, 2, 1));
        plan.update_have(0, bits(2, &[]), bits(2, &[0, 1]));
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(plan.next(&mut rng, false), None, "the peer will have them soon");
        assert!(matches!(plan.next(&mut rng, true), Some((_, From::Origin))));
        assert_eq!(plan.next(&mut rng, true), None, "only while nothing is in flight");
    }

    #[test]
    fn each_node_takes_its_stripe_then_steals_from_the_back_of_the_next() {
        let mut plan = Plan::new(8, 2, vec![], limits(1, 1, 1)).with_stripe(1, 3);
        let mut rng = StdRng::seed_from_u64(9);
        let mut order = Vec::new();
        while let Some((i, f)) = plan.next(&mut rng, false) {
            assert_eq!(f, From::Origin);
            order.push(i);
            plan.done(i, f);
        }
        assert_eq!(order, vec![1, 4, 7, 5, 2, 6, 3, 0]);
    }

    #[test]
    fn without_peers_the_origin_gets_every_slot() {
        let mut plan = Plan::new(10, 0, vec![], limits(4, 2, 1));
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<_> = std::iter::from_fn(|| plan.next(&mut rng, false)).collect();
        assert_eq!(picks.len(), 4);
        assert!(picks.iter().all(|(_, f)| *f == From::Origin));
    }

    #[test]
    fn peers_in_every_slot_do_not_keep_the_origin_waiting() {
        let mut plan = Plan::new(3, 1, vec![], limits(2, 2, 1));
        plan.update_have(0, bits(3, &[0, 1]), bits(3, &[2]));
        let mut rng = StdRng::seed_from_u64(2);
        assert!(matches!(plan.next(&mut rng, false), Some((0 | 1, From::Peer(0)))));
        assert!(matches!(plan.next(&mut rng, false), Some((0 | 1, From::Peer(0)))));
        assert_eq!(plan.next(&mut rng, false), None);
        // The peer gave up on piece 2: it is fresh again, and the origin slot is free.
        plan.update_have(0, bits(3, &[0, 1]), bits(3, &[]));
        assert_eq!(plan.next(&mut rng, false), Some((2, From::Origin)));
    }

    #[test]
    fn a_peer_is_not_asked_beyond_its_share() {
        let mut plan = Plan::new(5, 1, vec![], limits(10, 2, 0));
        plan.update_have(0, Bitmap::full(5), bits(5, &[]));
        let mut rng = StdRng::seed_from_u64(3);
        let picks: Vec<_> = std::iter::from_fn(|| plan.next(&mut rng, false)).collect();
        assert_eq!(picks.len(), 2);
        assert!(picks.iter().all(|(_, f)| *f == From::Peer(0)));
    }

    #[test]
    fn holders_are_chosen_at_random() {
        let mut seen = [0; 3];
        for seed in 0..60 {
            let mut plan = Plan::new(1, 3, vec![], limits(4, 2, 0));
            (0..3).for_each(|p| plan.update_have(p, Bitmap::full(1), bits(1, &[])));
            let Some((0, From::Peer(p))) = plan.next(&mut StdRng::seed_from_u64(seed), false) else { panic!("expected a peer") };
            seen[p] += 1;
        }
        assert!(seen.iter().all(|n| *n >= 5), "picks per holder: {seen:?}");
    }

    #[test]
    fn a_corrupt_peer_is_skipped_for_that_piece_then_dropped() {
        let mut plan = Plan::new(3, 2, vec![], limits(1, 2, 0));
        plan.update_have(0, Bitmap::full(3), bits(3, &[]));
        plan.update_have(1, Bitmap::full(3), bits(3, &[]));
        let mut rng = StdRng::seed_from_u64(5);
        let (i, from) = plan.next(&mut rng, false).unwrap();
        let From::Peer(bad) = from else { panic!("expected a peer") };
        assert_eq!(plan.failed(i, from, Failure::Corrupt), 1);
        assert_eq!(plan.next(&mut rng, false), Some((i, From::Peer(1 - bad))), "the same piece, from the other peer");
        plan.done(i, From::Peer(1 - bad));
        // A second bad piece and the peer is out: everything else comes from the good one.
        let j = (0..3).find(|j| *j != i).unwrap();
        plan.take(j, From::Peer(bad));
        plan.failed(j, From::Peer(bad), Failure::Corrupt);
        assert!(plan.is_banned(bad));
        plan.update_have(bad, Bitmap::full(3), bits(3, &[]));
        while let Some((k, f)) = plan.next(&mut rng, false) {
            assert_eq!(f, From::Peer(1 - bad));
            plan.done(k, f);
        }
        assert!(plan.is_complete());
    }

    #[test]
    fn not_held_clears_the_peers_bit() {
        let mut plan = Plan::new(1, 1, vec![], limits(4, 2, 1));
        plan.update_have(0, Bitmap::full(1), bits(1, &[]));
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(plan.next(&mut rng, false), Some((0, From::Peer(0))));
        plan.failed(0, From::Peer(0), Failure::NotHeld);
        assert_eq!(plan.next(&mut rng, false), Some((0, From::Origin)), "nobody holds it now");
    }

    #[test]
    fn failing_peers_are_dropped_after_errors_in_a_row() {
        let mut plan = Plan::new(4, 1, vec![], limits(1, 1, 0));
        plan.update_have(0, Bitmap::full(4), bits(4, &[]));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..BAN_AFTER_ERRORS {
            let (i, f) = plan.next(&mut rng, false).unwrap();
            assert!(matches!(f, From::Peer(0)));
            plan.failed(i, f, Failure::Other);
        }
        assert!(plan.is_banned(0));
        assert!(matches!(plan.next(&mut rng, false), Some((_, From::Origin))));
    }
}
