//! Scenario tests of each rule, and property tests that drive random event sequences through
//! the machine and check the invariants after every step.

use proptest::prelude::*;

use super::*;
use crate::domain::vm::VmAddress;

const T0: Millis = 1_000_000;

fn pool(min: u32, max: u32, linger: u64) -> PoolState {
    let mut p = PoolState::new(PoolRules::default(), PoolSize::default());
    p.set_size(min, max, linger, T0).unwrap();
    p
}

fn settle(p: &mut PoolState, now: Millis) {
    p.settle_instantly(now);
}

fn count(p: &PoolState, s: VmState) -> usize {
    p.vms().filter(|v| v.state == s).count()
}

#[test]
fn grows_to_min_and_boots_nothing_more() {
    let mut p = pool(3, 5, 1000);
    let boots = p.take_effects().iter().filter(|e| matches!(e, Effect::Boot { .. })).count();
    assert_eq!(boots, 3);
    assert_eq!(count(&p, VmState::Creating), 3);
    p.tick(T0 + 1);
    assert!(p.take_effects().is_empty());
}

#[test]
fn free_vms_above_min_linger_then_die() {
    let mut p = pool(2, 5, 1000);
    settle(&mut p, T0);
    p.set_size(0, 5, 1000, T0).unwrap();
    p.pinged(1, true, T0 + 500);
    p.tick(T0 + 1000);
    assert_eq!(p.vms().count(), 2, "not yet past linger");
    assert_eq!(p.next_deadline(), Some(T0 + 1001));
    p.tick(T0 + 1001);
    assert_eq!(p.vms().count(), 0);
    let kills = p.take_effects().iter().filter(|e| matches!(e, Effect::Kill { .. })).count();
    assert_eq!(kills, 2);
}

#[test]
fn above_max_kills_booting_first_then_free_never_occupied() {
    let mut p = pool(3, 3, 0);
    settle(&mut p, T0);
    let b = p.prepare_batch(1, "http://a".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    assert!(p.handle(h).unwrap().vm.is_some());
    p.set_size(0, 0, 0, T0).unwrap();
    assert_eq!(p.vms().count(), 1, "only the OCCUPIED VM stays");
    assert_eq!(count(&p, VmState::Occupied), 1);
}

#[test]
fn max_is_clamped_and_min_above_max_refused() {
    let mut p = pool(0, 0, 0);
    let r = p.set_size(1, 50, 0, T0).unwrap();
    assert_eq!(r.size.max, 30);
    assert_eq!(r.clamped_from, Some(50));
    let before = p.size();
    assert!(matches!(p.set_size(5, 2, 0, T0), Err(PoolInputError::Invalid { field: "min", .. })));
    assert_eq!(p.size(), before);
}

#[test]
fn preparation_is_fifo_across_batches() {
    let mut p = pool(0, 10, 60_000);
    let a = p.prepare_batch(2, "http://a".into(), T0).unwrap();
    let b = p.prepare_batch(1, "http://b".into(), T0).unwrap();
    assert_eq!(p.preps().copied().collect::<Vec<_>>(), vec![a, a, b]);
    let boots = p.take_effects();
    assert_eq!(boots.len(), 3, "queue longer than what boots: boot one per entry");
    // Boot VMs one at a time: each FREE VM goes to the front of the queue.
    let mut prepared_for = Vec::new();
    for e in boots {
        if let Effect::Boot { vm, op } = e {
            p.created(vm, op, Placement { node: 1, domain: "x".into() }, T0);
            p.booted(vm, op, VmAddress::default(), T0);
            for e in p.take_effects() {
                if let Effect::Prepare { batch, .. } = e {
                    prepared_for.push(batch);
                }
            }
        }
    }
    assert_eq!(prepared_for, vec![a, a, b]);
}

#[test]
fn over_locking_prepares_one_more() {
    let mut p = pool(0, 10, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h1 = p.lock(b, T0).unwrap();
    assert!(p.handle(h1).unwrap().vm.is_some(), "warm VM assigned at once");
    assert_eq!(p.batch(b).unwrap().size, 0);
    let h2 = p.lock(b, T0).unwrap();
    assert_eq!(p.handle(h2).unwrap().vm, None);
    assert_eq!(p.preps().count(), 1, "over-lock raised demand by one");
    settle(&mut p, T0);
    assert!(p.handle(h2).unwrap().vm.is_some());
    assert_ne!(p.handle(h1).unwrap().vm, p.handle(h2).unwrap().vm);
}

#[test]
fn release_cleans_vm_back_to_free_and_keeps_batch_size() {
    let mut p = pool(1, 10, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    let vm = p.handle(h).unwrap().vm.unwrap();
    p.take_effects();
    p.release(h, T0 + 5_000).unwrap();
    let served: Vec<Effect> = p.effects.iter().filter(|e| matches!(e, Effect::Served { .. })).cloned().collect();
    assert_eq!(served, vec![Effect::Served { handle: h, vm, node: 1, from: T0, to: T0 + 5_000 }], "one ledger row per session");
    assert_eq!(p.vm(vm).unwrap().state, VmState::Wait);
    assert!(p.handle(h).is_none());
    settle(&mut p, T0);
    assert_eq!(p.vm(vm).unwrap().state, VmState::Free);
    assert_eq!(p.batch(b).unwrap().size, 0);
    assert_eq!(p.release(h, T0), Err(PoolInputError::UnknownHandle(h)));
}

#[test]
fn cancel_with_pending_lock_still_satisfies_it_then_disappears() {
    let mut p = pool(0, 1, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    let h = p.lock(b, T0).unwrap();
    p.cancel_batch(b, T0).unwrap();
    assert!(p.batch(b).is_some(), "kept while a lock is pending");
    settle(&mut p, T0);
    let vm = p.handle(h).unwrap().vm.expect("pending lock satisfied after cancel");
    assert_eq!(p.vm(vm).unwrap().state, VmState::Occupied);
    assert!(p.batch(b).is_none(), "removed once empty");
}

#[test]
fn cancel_cleans_ready_vms_and_drops_queue() {
    let mut p = pool(0, 2, 60_000);
    let b = p.prepare_batch(4, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    assert_eq!(count(&p, VmState::Ready), 2);
    assert_eq!(p.preps().count(), 2, "max reached: two wait in the queue");
    p.cancel_batch(b, T0).unwrap();
    assert_eq!(p.preps().count(), 0);
    settle(&mut p, T0);
    assert_eq!(count(&p, VmState::Free), 2);
    assert!(p.batch(b).is_none());
}

#[test]
fn handles_expire_and_their_vm_is_cleaned() {
    let mut p = pool(1, 2, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    let at = p.renew_expire(h, 500, T0).unwrap();
    assert_eq!(at, T0 + 500);
    p.tick(T0 + 499);
    assert!(p.handle(h).is_some());
    p.pinged(1, true, T0 + 499);
    p.tick(T0 + 500);
    assert!(p.handle(h).is_none());
    assert!(p.take_effects().iter().any(|e| matches!(e, Effect::HandleEnded { why: HandleEnd::Expired, .. })));
}

#[test]
fn unpinged_vm_times_out_and_its_handle_is_lost() {
    let mut p = pool(1, 2, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    let vm = p.handle(h).unwrap().vm.unwrap();
    p.tick(T0 + 19_999);
    assert!(p.vm(vm).is_some());
    p.tick(T0 + 20_000);
    assert!(p.vm(vm).is_none(), "killed after 20 s without a ping");
    assert!(p.handle(h).is_none());
    assert!(p.take_effects().iter().any(|e| matches!(e, Effect::HandleEnded { why: HandleEnd::VmLost, .. })));
}

#[test]
fn a_lost_node_takes_its_vms_and_their_users_and_they_are_replaced() {
    use crate::domain::node::NodeUse;
    let mut p = pool(2, 4, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    assert!(p.handle(h).unwrap().vm.is_some());
    p.take_effects();
    p.set_node_use(1, NodeUse::Lost, T0 + 1);
    assert!(p.vms().all(|v| v.placement.is_none()), "no VM on the lost node stays");
    assert!(p.handle(h).is_none());
    let effects = &p.effects;
    assert!(effects.iter().any(|e| matches!(e, Effect::HandleEnded { why: HandleEnd::VmLost, .. })));
    assert_eq!(
        effects.iter().filter(|e| matches!(e, Effect::Served { to, .. } if *to == T0 + 1)).count(),
        1,
        "the lost session is served once"
    );
    assert!(effects.iter().any(|e| matches!(e, Effect::Boot { .. })), "replacements boot");
    p.settle_instantly_on(T0 + 1, 2);
    assert_eq!(count(&p, VmState::Free) + count(&p, VmState::Ready), 2);
    assert!(p.vms().all(|v| v.placement.as_ref().unwrap().node == 2));
}

#[test]
fn vms_whose_domain_the_node_no_longer_holds_leave() {
    let mut p = pool(2, 4, 60_000);
    settle(&mut p, T0);
    let keep: BTreeSet<String> = ["d1".to_string()].into();
    p.domains_reported(1, &keep, T0);
    assert!(p.vm(1).is_some());
    assert!(p.vm(2).is_none(), "d2 is gone from the node");
    p.domains_reported(7, &BTreeSet::new(), T0);
    assert!(p.vm(1).is_some(), "another node's report changes nothing here");
}

#[test]
fn no_user_is_given_a_vm_on_a_held_node() {
    use crate::domain::node::NodeUse;
    let mut p = pool(0, 2, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    assert_eq!(count(&p, VmState::Ready), 1);
    p.set_node_use(1, NodeUse::Hold, T0);
    let h = p.lock(b, T0).unwrap();
    settle(&mut p, T0);
    assert!(p.handle(h).unwrap().vm.is_none(), "the READY VM on a suspect node is not handed out");
    p.set_node_use(1, NodeUse::Normal, T0 + 1);
    assert!(p.handle(h).unwrap().vm.is_some(), "the node is back: the lock is served");
}

#[test]
fn draining_kills_idle_vms_and_keeps_users_until_release() {
    use crate::domain::node::NodeUse;
    let mut p = pool(2, 4, 60_000);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    let held = p.handle(h).unwrap().vm.unwrap();
    p.set_node_use(1, NodeUse::Drain, T0);
    assert_eq!(p.vms().filter(|v| v.placement.is_some()).map(|v| v.id).collect::<Vec<_>>(), vec![held]);
    p.settle_instantly_on(T0, 2);
    p.release(h, T0).unwrap();
    assert!(p.vm(held).is_none(), "released on a draining node: it leaves");
    p.settle_instantly_on(T0, 2);
    assert!(p.vms().all(|v| v.placement.as_ref().is_some_and(|pl| pl.node == 2)));
}

#[test]
fn sessions_end_at_the_maximum_duration_after_a_warning() {
    let mut p = PoolState::new(PoolRules { max_session: 10_000, session_warning: 2_000, ..PoolRules::default() }, PoolSize::default());
    p.set_size(1, 2, 60_000, T0).unwrap();
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    let vm = p.handle(h).unwrap().vm.unwrap();
    p.take_effects();
    assert_eq!(p.next_deadline().map(|d| d <= T0 + 8_000), Some(true), "the warning is a deadline");
    p.pinged(vm, true, T0 + 7_999);
    p.tick(T0 + 7_999);
    assert!(!p.take_effects().iter().any(|e| matches!(e, Effect::SessionEnding { .. })));
    p.tick(T0 + 8_000);
    assert_eq!(p.take_effects(), vec![Effect::SessionEnding { handle: h, ends_at: T0 + 10_000 }]);
    p.pinged(vm, true, T0 + 9_000);
    p.tick(T0 + 9_000);
    assert!(p.take_effects().is_empty(), "warned once");
    p.tick(T0 + 10_000);
    assert!(p.handle(h).is_none());
    let effects = p.take_effects();
    assert!(effects.iter().any(|e| matches!(e, Effect::HandleEnded { why: HandleEnd::MaxDuration, .. })));
    assert!(effects.iter().any(|e| matches!(e, Effect::Served { to, .. } if *to == T0 + 10_000)));
}

#[test]
fn a_password_rotated_by_prepare_is_the_one_handed_over() {
    let mut p = pool(0, 1, 60_000);
    let batch = p.prepare_batch(1, "a".into(), T0).unwrap();
    let Effect::Boot { vm, op } = p.take_effects()[0] else { unreachable!() };
    p.created(vm, op, Placement { node: 1, domain: "x".into() }, T0);
    p.booted(vm, op, VmAddress { vnc_passwd: "at-boot".into(), ..VmAddress::default() }, T0);
    let Effect::Prepare { vm, op, .. } = p.take_effects()[0].clone() else { panic!() };
    p.take_dirty();
    // A stale report (another op) changes nothing; the step's own does, before READY.
    p.vnc_password(vm, op + 100, "stale".into());
    assert_eq!(p.vm(vm).unwrap().address.vnc_passwd, "at-boot");
    p.vnc_password(vm, op, "fresh".into());
    assert!(p.take_dirty().vms.contains(&vm), "the new password is written");
    p.prepared(vm, op, true, T0);
    let h = p.lock(batch, T0).unwrap();
    let held = p.handle(h).and_then(|h| h.vm).and_then(|v| p.vm(v)).unwrap();
    assert_eq!(held.address.vnc_passwd, "fresh");
}

#[test]
fn failed_preparation_requeues_batch_at_front() {
    let mut p = pool(0, 1, 60_000);
    let a = p.prepare_batch(1, "a".into(), T0).unwrap();
    let bvm = match p.take_effects()[0] {
        Effect::Boot { vm, op } => (vm, op),
        _ => unreachable!(),
    };
    p.created(bvm.0, bvm.1, Placement { node: 1, domain: "x".into() }, T0);
    p.booted(bvm.0, bvm.1, VmAddress::default(), T0);
    let Effect::Prepare { vm, op, .. } = p.take_effects()[0].clone() else { panic!() };
    let b2 = p.prepare_batch(1, "b".into(), T0).unwrap();
    p.prepared(vm, op, false, T0);
    // The ERROR VM is dropped, batch a goes back to the front, then the VM is killed.
    let q: Vec<_> = p.preps().copied().collect();
    assert_eq!(q.first(), Some(&a));
    assert!(q.contains(&b2));
    assert!(p.vm(vm).is_none());
}

#[test]
fn boot_failure_backs_off() {
    let mut p = pool(1, 1, 0);
    let Effect::Boot { vm, op } = p.take_effects()[0] else { panic!() };
    p.boot_failed(vm, op, None, T0);
    assert!(p.vms().next().is_none(), "ERROR is killed at once");
    assert!(!p.take_effects().iter().any(|e| matches!(e, Effect::Boot { .. })), "no boot during backoff");
    assert_eq!(p.next_deadline(), Some(T0 + 500));
    p.tick(T0 + 500);
    assert!(p.take_effects().iter().any(|e| matches!(e, Effect::Boot { .. })));
}

#[test]
fn stale_results_are_ignored() {
    let mut p = pool(1, 1, 0);
    let Effect::Boot { vm, op } = p.take_effects()[0] else { panic!() };
    p.booted(vm, op + 99, VmAddress::default(), T0);
    assert_eq!(p.vm(vm).unwrap().state, VmState::Creating);
}

#[test]
fn restore_turns_unstable_vms_into_error_and_keeps_handles() {
    let mut p = pool(2, 4, 60_000);
    let b = p.prepare_batch(2, "h".into(), T0).unwrap();
    settle(&mut p, T0);
    let h = p.lock(b, T0).unwrap();
    let held = p.handle(h).unwrap().vm.unwrap();
    let h2 = p.lock(b, T0).unwrap();
    let h3 = p.lock(b, T0).unwrap(); // over-lock: a VM is booting for it
    let snap = p.snapshot();
    let mut r = PoolState::restore(PoolRules::default(), snap, T0 + 10);
    assert_eq!(r.handle(h).unwrap().vm, Some(held));
    assert!(r.handle(h2).is_some() && r.handle(h3).is_some());
    assert_eq!(r.vm(held).unwrap().state, VmState::Occupied);
    assert!(r.vms().all(|v| v.state.is_stable() || v.state == VmState::Error));
    r.tick(T0 + 10);
    r.check_invariants().unwrap();
}

// ---- properties ------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Size(u32, u32, u64),
    Prepare(u32),
    Lock(u64),
    Release(u64),
    Cancel(u64),
    Renew(u64, u64),
    Shutdown,
    Advance(u64),
    Ping(u64, bool),
    Node(u8),
    /// Finish the n-th outstanding effect, successfully or not.
    Finish(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..6, 0u32..8, 0u64..3000).prop_map(|(a, b, l)| Op::Size(a.min(b), b, l)),
        (0u32..4).prop_map(Op::Prepare),
        (1u64..6).prop_map(Op::Lock),
        (1u64..12).prop_map(Op::Release),
        (1u64..6).prop_map(Op::Cancel),
        (1u64..12, 0u64..5000).prop_map(|(h, ms)| Op::Renew(h, ms)),
        Just(Op::Shutdown),
        (0u64..25_000).prop_map(Op::Advance),
        (1u64..20, any::<bool>()).prop_map(|(v, ok)| Op::Ping(v, ok)),
        (0u8..4).prop_map(Op::Node),
        (0usize..8, prop::bool::weighted(0.85)).prop_map(|(i, ok)| Op::Finish(i, ok)),
        (0usize..8, prop::bool::weighted(0.85)).prop_map(|(i, ok)| Op::Finish(i, ok)),
        (0usize..8, prop::bool::weighted(0.85)).prop_map(|(i, ok)| Op::Finish(i, ok)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_random_events(ops in prop::collection::vec(op(), 1..120)) {
        // A short maximum session so that random runs reach warnings and forced ends.
        let rules = PoolRules { max_session: 30_000, session_warning: 5_000, ..PoolRules::default() };
        let mut p = PoolState::new(rules, PoolSize::default());
        let mut now = T0;
        let mut outstanding: Vec<Effect> = Vec::new();
        for op in ops {
            match op {
                Op::Size(a, b, l) => { let _ = p.set_size(a, b, l, now); }
                Op::Prepare(n) => { let _ = p.prepare_batch(n, "h".into(), now); }
                Op::Lock(b) => { let _ = p.lock(b, now); }
                Op::Release(h) => { let _ = p.release(h, now); }
                Op::Cancel(b) => { let _ = p.cancel_batch(b, now); }
                Op::Renew(h, ms) => { let _ = p.renew_expire(h, ms, now); }
                Op::Shutdown => p.shutdown(now),
                Op::Advance(ms) => { now += ms; p.tick(now); }
                Op::Ping(vm, ok) => p.pinged(vm, ok, now),
                Op::Node(u) => {
                    use crate::domain::node::NodeUse::*;
                    p.set_node_use(1, [Normal, Hold, Drain, Lost][usize::from(u)], now);
                }
                Op::Finish(i, ok) => {
                    if !outstanding.is_empty() {
                        let e = outstanding.remove(i % outstanding.len());
                        match e {
                            Effect::Boot { vm, op } if ok => {
                                p.created(vm, op, Placement { node: 1, domain: "d".into() }, now);
                                p.booted(vm, op, VmAddress::default(), now);
                            }
                            Effect::Boot { vm, op } => p.boot_failed(vm, op, None, now),
                            Effect::Prepare { vm, op, .. } => p.prepared(vm, op, ok, now),
                            Effect::Cleanup { vm, op } => p.cleaned(vm, op, ok, now),
                            _ => {}
                        }
                    }
                }
            }
            outstanding.extend(p.take_effects().into_iter().filter(|e| matches!(e, Effect::Boot { .. } | Effect::Prepare { .. } | Effect::Cleanup { .. })));
            if let Err(e) = p.check_invariants() {
                prop_assert!(false, "{}", e);
            }
            // After a step the rules have settled: no deadline is already due (a due one would
            // make the shell's timer fire at once, forever).
            if let Some(d) = p.next_deadline() {
                prop_assert!(d > now, "deadline {} not after now {}", d, now);
            }
            // The pool never exceeds max except by VMs the rules may not kill.
            let killable = p.vms().filter(|v| matches!(v.state, VmState::Free | VmState::Booting)).count();
            prop_assert!(p.vms().count() <= p.size().max as usize || killable == 0,
                "{} VMs above max {} with {} killable", p.vms().count(), p.size().max, killable);
            // A pending lock never waits while its batch has a READY VM on a usable node.
            for pl in p.pending() {
                let usable = |v: &crate::domain::vm::Vm| v.state == VmState::Ready && p.node_use_of(v) == crate::domain::node::NodeUse::Normal;
                let ready = p.batch(pl.batch).is_some_and(|b| b.vms.iter().any(|v| p.vm(*v).is_some_and(usable)));
                prop_assert!(!ready, "pending lock {:?} waits beside a READY VM", pl);
            }
            // Restoring the snapshot keeps every handle.
            let r = PoolState::restore(PoolRules::default(), p.snapshot(), now);
            prop_assert_eq!(r.handles().count(), p.handles().count());
        }
    }

    /// With a healthy instant hypervisor and room to grow, every pending lock gets a VM.
    #[test]
    fn every_lock_is_eventually_assigned(locks in prop::collection::vec(1u64..4, 1..20), sizes in prop::collection::vec(0u32..3, 3)) {
        let mut p = pool(0, 30, 60_000);
        for s in sizes { p.prepare_batch(s, "h".into(), T0).unwrap(); }
        for b in locks { p.lock(b, T0).unwrap(); }
        settle(&mut p, T0);
        prop_assert_eq!(p.pending().count(), 0);
        prop_assert!(p.handles().all(|h| h.vm.is_some()));
        p.check_invariants().map_err(TestCaseError::fail)?;
    }
}

#[test]
fn after_a_backed_off_retry_no_deadline_is_in_the_past() {
    let mut p = pool(0, 1, 60_000);
    p.prepare_batch(1, "h".into(), T0).unwrap();
    let Effect::Boot { vm, op } = p.take_effects()[0] else { panic!() };
    p.boot_failed(vm, op, None, T0);
    p.tick(T0 + 500);
    assert!(p.take_effects().iter().any(|e| matches!(e, Effect::Boot { .. })), "retried after the backoff");
    p.tick(T0 + 1000);
    assert!(p.next_deadline().is_none_or(|d| d > T0 + 1000), "deadline {:?} already due", p.next_deadline());
}

#[test]
fn a_domain_created_for_a_vm_killed_meanwhile_is_destroyed() {
    let mut p = pool(1, 1, 0);
    let Effect::Boot { vm, op } = p.take_effects()[0] else { panic!() };
    p.set_size(0, 0, 0, T0).unwrap();
    p.tick(T0 + 10_001); // CREATING timed out: the VM left the pool
    assert!(p.vm(vm).is_none());
    p.take_effects();
    let placement = Placement { node: 1, domain: "late".into() };
    p.created(vm, op, placement.clone(), T0 + 10_002);
    assert_eq!(p.take_effects(), vec![Effect::Destroy { vm, placement }]);
}

#[test]
fn batches_above_the_limit_are_refused() {
    let mut p = pool(0, 1, 0);
    assert!(matches!(p.prepare_batch(1001, "h".into(), T0), Err(PoolInputError::Invalid { field: "size", .. })));
    assert!(p.batches().next().is_none());
}

#[test]
fn restore_drops_pending_locks_without_a_handle() {
    let mut p = pool(0, 0, 0);
    let b = p.prepare_batch(1, "h".into(), T0).unwrap();
    let h = p.lock(b, T0).unwrap();
    let mut snap = p.snapshot();
    snap.pending.push(PendingLock { batch: b, handle: 99 });
    let r = PoolState::restore(PoolRules::default(), snap, T0);
    assert_eq!(r.pending().map(|p| p.handle).collect::<Vec<_>>(), vec![h]);
    r.check_invariants().unwrap();
}

#[test]
fn a_home_page_with_control_characters_is_refused_and_changes_nothing() {
    let mut p = pool(1, 2, 0);
    settle(&mut p, T0);
    for bad in ["http://a\0b", "http://a\nb", "\u{7f}"] {
        let err = p.prepare_batch(1, bad.into(), T0).unwrap_err();
        assert!(matches!(err, PoolInputError::Invalid { field: "home_page", .. }), "{bad:?}: {err:?}");
    }
    assert!(p.take_effects().is_empty(), "nothing happened");
    assert_eq!(p.prepare_batch(1, "http://a".into(), T0).unwrap(), 1, "no batch id was used up");
}
