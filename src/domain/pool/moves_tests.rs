//! The move rules: who may move, what a move's result does, and stale results.

use super::*;
use crate::domain::vm::VmAddress;

const T0: Millis = 1_000_000;

fn settled(min: u32) -> PoolState {
    let mut p = PoolState::new(PoolRules::default(), PoolSize::default());
    p.set_size(min, 5, 60_000, T0).unwrap();
    p.settle_instantly(T0);
    p
}

fn moves(p: &mut PoolState) -> Vec<(VmId, u64, Placement, NodeId)> {
    p.take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Move { vm, op, from, to, .. } => Some((vm, op, from, to)),
            _ => None,
        })
        .collect()
}

fn at(node: NodeId, vm: VmId) -> Placement {
    Placement { node, domain: format!("p-{vm}-n{node}") }
}

#[test]
fn a_free_vm_moves_and_comes_back_free_on_its_new_node() {
    let mut p = settled(1);
    let started = p.start_move(1, 2, T0 + 1).unwrap();
    assert_eq!((started.from.node, started.to), (1, 2));
    assert_eq!(p.vm(1).unwrap().state, VmState::Wait);
    assert!(p.is_moving(1));
    let m = moves(&mut p);
    assert_eq!(m.len(), 1);
    // Long past every WAIT and health timeout: a moving VM is the mover's.
    p.tick(T0 + 3_600_000);
    assert_eq!(p.vm(1).map(|v| v.state), Some(VmState::Wait), "not killed while moving");
    let address = VmAddress { ip: "10.0.2.1".into(), ..VmAddress::default() };
    p.moved(1, m[0].1, at(2, 1), address.clone(), T0 + 3_600_001);
    let v = p.vm(1).unwrap();
    assert_eq!((v.state, v.placement.clone(), v.address.clone()), (VmState::Free, Some(at(2, 1)), address));
    assert!(!p.is_moving(1));
    p.check_invariants().unwrap();
}

#[test]
fn a_ready_vm_is_prepared_again_for_its_batch_after_the_move() {
    let mut p = settled(1);
    let b = p.prepare_batch(1, "http://home".into(), T0).unwrap();
    p.settle_instantly(T0);
    assert_eq!(p.vm(1).unwrap().state, VmState::Ready);
    let op = p.start_move(1, 2, T0 + 1).unwrap().op;
    // Not handed out while it moves: a lock waits.
    let h = p.lock(b, T0 + 2).unwrap();
    assert_eq!(p.handle(h).unwrap().vm, None);
    p.take_effects();
    p.moved(1, op, at(2, 1), VmAddress::default(), T0 + 3);
    let prepares: Vec<_> = p.take_effects().into_iter().filter(|e| matches!(e, Effect::Prepare { vm: 1, .. })).collect();
    assert_eq!(prepares.len(), 1, "prepared again on its new node");
    let Effect::Prepare { op, .. } = prepares[0] else { unreachable!() };
    p.prepared(1, op, true, T0 + 4);
    assert_eq!(p.handle(h).unwrap().vm, Some(1), "then handed to the waiting lock");
    assert_eq!(p.vm(1).unwrap().placement, Some(at(2, 1)));
    p.check_invariants().unwrap();
}

#[test]
fn refused_moves_change_nothing() {
    let mut p = settled(2);
    let b = p.prepare_batch(1, "http://home".into(), T0).unwrap();
    p.settle_instantly(T0);
    let h = p.lock(b, T0).unwrap();
    let cleaning = p.handle(h).unwrap().vm.unwrap();
    p.release(h, T0).unwrap();
    assert_eq!(p.vm(cleaning).unwrap().state, VmState::Wait);
    let before = p.snapshot();
    assert!(matches!(p.start_move(99, 2, T0), Err(PoolInputError::UnknownVm(99))));
    assert!(matches!(p.start_move(cleaning, 2, T0), Err(PoolInputError::Invalid { field: "vm", .. })), "being cleaned");
    let free = p.vms().find(|v| v.state == VmState::Free).unwrap().id;
    assert!(matches!(p.start_move(free, 1, T0), Err(PoolInputError::Invalid { field: "node", .. })), "already there");
    assert_eq!(p.snapshot(), before);
    assert!(p.take_effects().iter().all(|e| !matches!(e, Effect::Move { .. })));
    p.start_move(free, 2, T0).unwrap();
    let again = p.snapshot();
    assert!(matches!(p.start_move(free, 3, T0), Err(PoolInputError::Invalid { field: "vm", .. })), "already moving");
    assert_eq!(p.snapshot(), again);
}

#[test]
fn a_failed_move_leaves_the_vm_where_it_was_or_in_error() {
    let mut p = settled(2);
    let op1 = p.start_move(1, 2, T0).unwrap().op;
    let op2 = p.start_move(2, 2, T0).unwrap().op;
    p.move_failed(1, op1, true, T0 + 1);
    let v = p.vm(1).unwrap();
    assert_eq!((v.state, v.placement.as_ref().map(|p| p.node)), (VmState::Free, Some(1)));
    p.move_failed(2, op2, false, T0 + 1);
    // Not restored: ERROR, then killed and replaced.
    assert!(p.vm(2).is_none_or(|v| v.state == VmState::Error));
    p.check_invariants().unwrap();
}

#[test]
fn a_vm_that_left_the_pool_during_its_move_has_its_new_domain_destroyed() {
    let mut p = settled(1);
    let op = p.start_move(1, 2, T0).unwrap().op;
    p.take_effects();
    // Even its node being lost leaves a moving VM to the mover, which reports.
    p.set_node_use(1, crate::domain::node::NodeUse::Lost, T0 + 1);
    assert_eq!(p.vm(1).map(|v| v.state), Some(VmState::Wait));
    p.move_failed(1, op, false, T0 + 1);
    assert!(p.vm(1).is_none(), "in ERROR on a lost node: killed");
    p.take_effects();
    p.moved(1, op, at(2, 1), VmAddress::default(), T0 + 2);
    let e = p.take_effects();
    assert!(e.contains(&Effect::Destroy { vm: 1, placement: at(2, 1) }), "{e:?}");
    // A stale result for a VM that is still there (moved again since) destroys only its own domain.
    let mut q = settled(1);
    let old = q.start_move(1, 2, T0).unwrap().op;
    q.move_failed(1, old, true, T0 + 1);
    q.take_effects();
    q.moved(1, old, at(2, 1), VmAddress::default(), T0 + 2);
    assert_eq!(q.vm(1).unwrap().placement.as_ref().map(|p| p.node), Some(1));
    assert!(q.take_effects().contains(&Effect::Destroy { vm: 1, placement: at(2, 1) }));
}

/// A pool of two with VM 1 held by a user; answers the handle.
fn occupied() -> (PoolState, HandleId) {
    let mut p = settled(2);
    let b = p.prepare_batch(1, "http://home".into(), T0).unwrap();
    p.settle_instantly(T0);
    let h = p.lock(b, T0).unwrap();
    assert_eq!(p.handle(h).unwrap().vm, Some(1));
    p.take_effects();
    (p, h)
}

fn live_move(p: &mut PoolState, vm: VmId, to: NodeId, now: Millis) -> u64 {
    let started = p.start_move(vm, to, now).unwrap();
    assert!(started.live);
    let e = p.take_effects();
    assert!(e.iter().any(|e| matches!(e, Effect::Move { vm: v, live: true, .. } if *v == vm)), "{e:?}");
    started.op
}

#[test]
fn an_occupied_vm_moves_live_keeps_its_user_and_is_replaced_once_released() {
    let (mut p, h) = occupied();
    let op = live_move(&mut p, 1, 2, T0 + 1);
    assert_eq!(p.vm(1).unwrap().state, VmState::Occupied, "its user keeps it while it moves");
    let later = T0 + PoolRules::default().timeouts.healthy + 1;
    p.tick(later);
    assert_eq!(p.handle(h).unwrap().vm, Some(1), "no health timeout while it moves");
    let address = VmAddress { vnc_port: 5903, ..VmAddress::default() };
    p.moved(1, op, at(2, 1), address.clone(), later + 1);
    let v = p.vm(1).unwrap();
    assert_eq!((v.state, v.placement.clone(), v.address.clone()), (VmState::Occupied, Some(at(2, 1)), address));
    assert_eq!(p.handle(h).unwrap().vm, Some(1));
    p.check_invariants().unwrap();
    p.take_effects();
    // Its clean snapshot stayed on node 1: once released it is replaced, not cleaned.
    p.release(h, later + 2).unwrap();
    let e = p.take_effects();
    assert!(e.contains(&Effect::Kill { vm: 1, placement: Some(at(2, 1)) }), "{e:?}");
    assert!(!e.iter().any(|e| matches!(e, Effect::Cleanup { vm: 1, .. })), "{e:?}");
    assert!(p.vm(1).is_none());
    p.check_invariants().unwrap();
}

#[test]
fn a_user_who_leaves_during_a_live_move_gets_the_vm_cleaned_or_replaced_after_it() {
    // Moved: replaced on its new node.
    let (mut p, h) = occupied();
    let op = live_move(&mut p, 1, 2, T0);
    p.release(h, T0 + 1).unwrap();
    assert_eq!(p.vm(1).unwrap().state, VmState::Wait, "waits for the move");
    assert!(!p.take_effects().iter().any(|e| matches!(e, Effect::Cleanup { .. } | Effect::Kill { .. })));
    p.check_invariants().unwrap();
    p.moved(1, op, at(2, 1), VmAddress::default(), T0 + 2);
    assert!(p.take_effects().contains(&Effect::Kill { vm: 1, placement: Some(at(2, 1)) }));
    // Failed, still where it was: cleaned there as usual.
    let (mut q, h) = occupied();
    let op = live_move(&mut q, 1, 2, T0);
    q.release(h, T0 + 1).unwrap();
    q.move_failed(1, op, true, T0 + 2);
    assert!(q.take_effects().iter().any(|e| matches!(e, Effect::Cleanup { vm: 1, .. })));
    assert_eq!(q.vm(1).unwrap().placement.as_ref().map(|p| p.node), Some(1));
    q.check_invariants().unwrap();
}

#[test]
fn a_failed_live_move_leaves_the_user_on_the_old_node_or_loses_the_vm() {
    let (mut p, h) = occupied();
    let op = live_move(&mut p, 1, 2, T0);
    p.move_failed(1, op, true, T0 + 1);
    let v = p.vm(1).unwrap();
    assert_eq!((v.state, v.placement.as_ref().map(|p| p.node)), (VmState::Occupied, Some(1)));
    assert_eq!(p.handle(h).unwrap().vm, Some(1));
    // Released later: cleaned, as it never left its clean snapshot's node.
    p.release(h, T0 + 2).unwrap();
    assert!(p.take_effects().iter().any(|e| matches!(e, Effect::Cleanup { vm: 1, .. })));

    let (mut q, h) = occupied();
    let op = live_move(&mut q, 1, 2, T0);
    q.move_failed(1, op, false, T0 + 1);
    assert!(q.vm(1).is_none(), "not restored: gone");
    assert!(q.handle(h).is_none(), "and its user lost it");
    assert!(q.take_effects().contains(&Effect::HandleEnded { handle: h, why: HandleEnd::VmLost }));
    q.check_invariants().unwrap();
}
