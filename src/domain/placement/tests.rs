//! Each distributor's behaviour, and the balls-into-bins statistics the spec quotes, on 1,000
//! simulated bins with a fixed seed.

use super::*;

fn bins(n: u64, capacity: u64) -> Vec<Bin> {
    (1..=n).map(|id| Bin { id, capacity, used: 0, weight: 1 }).collect()
}

/// Throw `balls` unit items into `bins` one at a time, recording each placement.
fn throw(d: &mut Distributor, bins: &mut [Bin], balls: usize) {
    for _ in 0..balls {
        let [id] = d.place(bins, 1, 1).unwrap()[..] else { panic!("one replica") };
        bins.iter_mut().find(|b| b.id == id).unwrap().used += 1;
    }
}

fn max_load(bins: &[Bin]) -> u64 {
    bins.iter().map(|b| b.used).max().unwrap()
}

#[test]
fn replicas_go_to_distinct_bins_with_room() {
    for s in [Strategy::RoundRobin, Strategy::Random, Strategy::TwoChoices, Strategy::SortUf, Strategy::RoundRobinWeight] {
        let mut d = Distributor::new(s, 7);
        let mut b = bins(5, 10);
        b[1].used = 10; // full
        for _ in 0..50 {
            let got = d.place(&b, 1, 3).unwrap();
            assert_eq!(got.len(), 3, "{s:?}");
            let mut uniq = got.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), 3, "{s:?}: distinct bins");
            assert!(!got.contains(&2), "{s:?}: the full bin is never chosen");
        }
    }
}

#[test]
fn too_few_bins_with_room_is_an_error_and_places_nothing() {
    let mut d = Distributor::new(Strategy::Random, 1);
    let b = bins(3, 4);
    assert_eq!(d.place(&b, 5, 1), Err(PlacementError::NotEnoughBins { replicas: 1, size: 5, fitting: 0 }));
    assert_eq!(d.place(&b, 1, 4), Err(PlacementError::NotEnoughBins { replicas: 4, size: 1, fitting: 3 }));
}

#[test]
fn round_robin_cycles_in_id_order_and_skips_full_bins() {
    let mut d = Distributor::new(Strategy::RoundRobin, 0);
    let mut b = bins(3, 10);
    let picks: Vec<u64> = (0..4).map(|_| d.place(&b, 1, 1).unwrap()[0]).collect();
    assert_eq!(picks, vec![1, 2, 3, 1]);
    b[1].used = 10;
    let picks: Vec<u64> = (0..3).map(|_| d.place(&b, 1, 1).unwrap()[0]).collect();
    assert_eq!(picks, vec![3, 1, 3]);
}

#[test]
fn sort_uf_takes_the_least_utilized_bin_by_factor_not_by_count() {
    let mut d = Distributor::new(Strategy::SortUf, 0);
    let b = vec![
        Bin { id: 1, capacity: 100, used: 30, weight: 1 },   // 0.30
        Bin { id: 2, capacity: 10, used: 2, weight: 1 },     // 0.20
        Bin { id: 3, capacity: 1000, used: 250, weight: 1 }, // 0.25
    ];
    assert_eq!(d.place(&b, 1, 2).unwrap(), vec![2, 3]);
}

#[test]
fn weighted_round_robin_shares_by_weight() {
    let mut d = Distributor::new(Strategy::RoundRobinWeight, 0);
    let b = vec![
        Bin { id: 1, capacity: 1000, used: 0, weight: 5 },
        Bin { id: 2, capacity: 1000, used: 0, weight: 1 },
        Bin { id: 3, capacity: 1000, used: 0, weight: 1 },
    ];
    let mut count = [0; 3];
    for _ in 0..700 {
        count[d.place(&b, 1, 1).unwrap()[0] as usize - 1] += 1;
    }
    assert_eq!(count, [500, 100, 100], "exact shares over whole rounds");
}

/// Seeds for the statistical test: a plain list fixed in advance, not picked for the outcome.
const SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// Maximum load minus the mean load m / n after throwing `m` unit balls into `n` bins of equal,
/// unbounded capacity (so a bin's load is its ball count).
fn gap_above_mean(strategy: Strategy, seed: u64, n: u64, m: u64) -> f64 {
    let mut b = bins(n, u64::MAX);
    throw(&mut Distributor::new(strategy, seed), &mut b, m as usize);
    max_load(&b) as f64 - m as f64 / n as f64
}

/// The spec: with n balls in n bins, RANDOM's maximum load is about ln n / ln ln n and
/// TWO_CHOICES' about ln ln n / ln 2 + O(1) above the mean. Heavily loaded (m = 10 n), the gap
/// above the mean stays ln ln n / ln 2 + O(1) for TWO_CHOICES while RANDOM's grows like
/// sqrt(m ln n / n). On 1,000 bins, over the fixed SEEDS.
///
/// Measured (rand 0.9 StdRng), seeds 1-8: m = n: RANDOM max 5,5,5,6,5,5,6,6 (mean 5.4),
/// TWO_CHOICES max 3 with every seed; m = 10 n: RANDOM gap 13,9,15,14,10,10,11,11 (mean 11.6),
/// TWO_CHOICES gap 2 with every seed. Over seeds 0-39: RANDOM max 5-7 and heavy gap 9-16,
/// TWO_CHOICES max 2-3 and heavy gap 2-3. The bounds below come from theory, not from these.
#[test]
fn two_choices_beats_random_as_balls_into_bins_predicts() {
    let n = 1000u64;
    let ln_n = (n as f64).ln();
    let random_expect = ln_n / ln_n.ln(); // ≈ 3.58
    let two_expect = ln_n.ln() / std::f64::consts::LN_2; // ≈ 2.79
    let heavy_scale = (10.0 * ln_n).sqrt(); // sqrt(m ln n / n) ≈ 8.31 at m = 10 n

    let (mut random_sum, mut two_sum, mut random_heavy_sum) = (0.0, 0.0, 0.0);
    for seed in SEEDS {
        // m = n: the mean load is 1.
        let (r, t) = (gap_above_mean(Strategy::Random, seed, n, n), gap_above_mean(Strategy::TwoChoices, seed, n, n));
        // m = 10 n: the mean load is 10.
        let (rh, th) = (gap_above_mean(Strategy::Random, seed, n, 10 * n), gap_above_mean(Strategy::TwoChoices, seed, n, 10 * n));
        eprintln!("seed {seed}: m=n RANDOM max {}, TWO_CHOICES max {}; m=10n gaps RANDOM {rh}, TWO_CHOICES {th}", r + 1.0, t + 1.0);

        // ln n / ln ln n is only the leading term: at n = 1,000 the lower-order terms add about
        // 2-3 (the typical maximum is 5-6), hence the wide upper tolerance.
        let random_max = r + 1.0;
        assert!(
            random_max >= random_expect - 1.0 && random_max <= random_expect + 4.0,
            "seed {seed}: RANDOM max {random_max}, expected about {random_expect:.2}"
        );
        assert!(t <= two_expect + 2.0, "seed {seed}: TWO_CHOICES gap {t}, expected {two_expect:.2} + O(1)");
        assert!(th <= two_expect + 2.0, "seed {seed}, m = 10 n: TWO_CHOICES gap {th}, expected {two_expect:.2} + O(1)");
        assert!(t < r, "seed {seed}: TWO_CHOICES max ({}) strictly below RANDOM's ({})", t + 1.0, r + 1.0);
        assert!(th < rh, "seed {seed}, m = 10 n: TWO_CHOICES max ({}) strictly below RANDOM's ({})", th + 10.0, rh + 10.0);
        random_sum += r;
        two_sum += t;
        random_heavy_sum += rh;
    }
    let k = SEEDS.len() as f64;
    let (random_mean, two_mean, random_heavy_mean) = (random_sum / k, two_sum / k, random_heavy_sum / k);
    assert!(random_mean >= two_mean + 1.0, "mean gaps at m = n: RANDOM {random_mean}, TWO_CHOICES {two_mean}");
    // The Gaussian estimate is sqrt(2 m ln n / n) ≈ 1.41 × scale; at 10 balls a bin the Poisson
    // tail is heavier than the Gaussian one, so allow up to 2 × scale.
    assert!(
        random_heavy_mean >= heavy_scale && random_heavy_mean <= 2.0 * heavy_scale,
        "m = 10 n: RANDOM mean gap {random_heavy_mean}, expected between {heavy_scale:.2} and {:.2}",
        2.0 * heavy_scale
    );
}

#[test]
fn the_same_seed_repeats_the_same_placements() {
    let b = bins(50, 10);
    let run = |seed| {
        let mut d = Distributor::new(Strategy::TwoChoices, seed);
        (0..20).map(|_| d.place(&b, 1, 2).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}
