//! Unit tests of the lifecycle rules, and a property test: random command sequences from
//! several users never move an object backwards, never let one user touch or derive from
//! another's objects, and never create an environment beyond its owner's limit.

use proptest::prelude::*;

use super::*;

fn traits() -> Traits {
    Traits { backend: Backend::Vm, os: OsFamily::Linux, protocol: Protocol::Vnc }
}

fn obj(id: u64, kind: Kind, owner: &str, parent: Option<u64>, phase: Phase) -> Object {
    Object {
        id,
        kind,
        name: format!("o{id}"),
        owner: owner.into(),
        parent,
        traits: traits(),
        phase,
        reason: None,
        spec: Spec { interactive: kind != Kind::Baseimage, ..Spec::default() },
        runtime: Runtime::default(),
        created_at: 0,
        updated_at: 0,
    }
}

fn user(u: &str) -> Caller {
    Caller::User(u.into())
}

/// A ready baseimage 1, alice's ready environment 2 and ready deployment 3.
fn book() -> Book {
    Book::new(
        [
            obj(1, Kind::Baseimage, ADMIN_OWNER, None, Phase::Ready),
            obj(2, Kind::Environment, "alice", Some(1), Phase::Ready),
            obj(3, Kind::Deployment, "alice", Some(2), Phase::Ready),
        ],
        [("alice".to_string(), 1), ("bob".to_string(), 1)],
    )
}

#[test]
fn phases_only_move_forward() {
    use Phase::*;
    assert!(forward(Create, ConfigAuto) && forward(ConfigAuto, Finalize) && forward(Finalize, Ready));
    assert!(forward(Ready, Deleting) && forward(Deleting, Failed) && forward(Failed, Deleting) && forward(Create, Failed));
    assert!(!forward(Ready, Create) && !forward(Finalize, ConfigInteractive) && !forward(Failed, Ready) && !forward(Deleting, Ready));
    assert!(!forward(Ready, Ready));
}

#[test]
fn traits_refuse_containers_and_rdp_off_windows() {
    assert!(check_traits(&traits()).is_ok());
    let rdp = Traits { protocol: Protocol::Rdp, ..traits() };
    assert!(matches!(check_traits(&rdp), Err(Refusal::Invalid { field: "protocol", .. })));
    assert!(check_traits(&Traits { os: OsFamily::Windows, ..rdp }).is_ok());
    let container = Traits { backend: Backend::Container, ..rdp };
    assert!(matches!(check_traits(&container), Err(Refusal::NotSupported(_))), "container is answered first");
}

#[test]
fn environments_are_limited_per_user_until_raised() {
    let mut b = book();
    assert!(matches!(b.check_derive(&user("alice"), Kind::Environment, 1), Err(Refusal::LimitReached { held: 1, .. })));
    assert_eq!(b.check_derive(&user("bob"), Kind::Environment, 1).unwrap(), "bob");
    assert_eq!(b.check_derive(&Caller::Admin, Kind::Environment, 1).unwrap(), ADMIN_OWNER, "admins have no limit");
    b.set_limit("alice", 2);
    assert_eq!(b.check_derive(&user("alice"), Kind::Environment, 1).unwrap(), "alice");
}

#[test]
fn nothing_crosses_users() {
    let b = book();
    assert!(matches!(b.check_derive(&user("bob"), Kind::Deployment, 2), Err(Refusal::Forbidden(_))));
    assert!(matches!(b.check_derive(&user("bob"), Kind::App, 3), Err(Refusal::Forbidden(_))));
    assert!(matches!(b.check_delete(&user("bob"), Kind::Deployment, 3), Err(Refusal::Forbidden(_))));
    assert!(matches!(b.read(&user("bob"), Kind::Environment, 2), Err(Refusal::Forbidden(_))));
    assert!(b.read(&user("bob"), Kind::Baseimage, 1).is_ok(), "baseimages are for everyone");
    assert_eq!(b.check_derive(&Caller::Admin, Kind::App, 3).unwrap(), "alice", "an admin's app on alice's deployment is alice's");
    assert!(b.list(&user("bob"), Kind::Environment).is_empty());
    assert_eq!(b.list(&Caller::Admin, Kind::Environment).len(), 1);
    assert!(matches!(b.check_baseimage(&user("alice")), Err(Refusal::Forbidden(_))));
}

#[test]
fn transitions_need_a_ready_parent_and_the_right_phase() {
    let mut b = book();
    b.insert(obj(4, Kind::Environment, "bob", Some(1), Phase::ConfigInteractive));
    let e = b.check_derive(&user("bob"), Kind::Deployment, 4).unwrap_err();
    assert_eq!(e.to_string(), "environment 4 is in phase config_interactive; CreateSnapshot is not possible now");
    assert!(matches!(b.check_done(&user("alice"), Kind::Environment, 2), Err(Refusal::BadTransition { current: "ready", .. })));
    assert_eq!(b.check_done(&user("bob"), Kind::Environment, 4).unwrap(), Phase::Finalize);
    assert!(matches!(b.check_derive(&user("alice"), Kind::App, 2), Err(Refusal::Unknown("deployment", 2))), "ids are per kind");
    assert!(matches!(b.check_delete(&user("alice"), Kind::Environment, 2), Err(Refusal::HasChildren { children: 1, .. })));
    b.insert(obj(5, Kind::App, "alice", Some(3), Phase::Create));
    assert!(matches!(b.check_delete(&user("alice"), Kind::App, 5), Err(Refusal::BadTransition { current: "create", .. })));
    assert!(matches!(b.check_derive(&user("alice"), Kind::App, 3), Err(Refusal::Busy(_))), "one VM, one user at a time");
}

#[test]
fn automatic_steps_walk_the_sub_phases() {
    let mut b = book();
    let mut e = obj(4, Kind::Environment, "bob", Some(1), Phase::Create);
    let mut seen = vec![e.phase];
    b.insert(e.clone());
    while let Ok(next) = b.check_advance(4) {
        if next == Phase::Finalize && e.phase == Phase::ConfigInteractive {
            assert_eq!(b.check_done(&user("bob"), Kind::Environment, 4).unwrap(), next);
        }
        e.phase = next;
        seen.push(next);
        b.insert(e.clone());
        if next == Phase::Ready {
            break;
        }
    }
    use Phase::*;
    assert_eq!(seen, vec![Create, ConfigAuto, ConfigInteractive, Finalize, Ready]);
    b.insert(obj(6, Kind::App, "alice", Some(3), Phase::Create));
    assert_eq!(b.check_advance(6).unwrap(), Ready, "an app has no sub-phases");
    assert!(b.check_advance(2).is_err(), "nothing runs on a ready object");
}

#[derive(Clone, Debug)]
enum Cmd {
    Base,
    Derive(usize, Kind, usize),
    Advance(usize),
    Fail(usize),
    Done(usize, usize),
    Delete(usize, usize),
    Deleted(usize, bool),
    Limit(usize, u32),
}

const USERS: [&str; 2] = ["u0", "u1"];

/// Half of the time the owner of `obj` (or the admin, for an admin's object): runs should get
/// far; the other half anyone, so that cross-user attempts are frequent too.
fn caller(i: usize, b: &Book, obj: u64) -> Caller {
    let owner = b.object(obj).map(|o| o.owner.clone()).filter(|o| o != ADMIN_OWNER);
    match (i % 2, owner) {
        (0, Some(o)) => user(&o),
        _ if i / 2 == USERS.len() => Caller::Admin,
        _ => user(USERS[(i / 2) % USERS.len()]),
    }
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let who = 0..2 * (USERS.len() + 1);
    let kind = prop_oneof![1 => Just(Kind::Environment), 2 => Just(Kind::Deployment), 3 => Just(Kind::App)];
    prop_oneof![
        1 => Just(Cmd::Base),
        6 => (who.clone(), kind, 0..12usize).prop_map(|(c, k, p)| Cmd::Derive(c, k, p)),
        10 => (0..12usize).prop_map(Cmd::Advance),
        1 => (0..12usize).prop_map(Cmd::Fail),
        5 => (who.clone(), 0..12usize).prop_map(|(c, p)| Cmd::Done(c, p)),
        1 => (who, 0..12usize).prop_map(|(c, p)| Cmd::Delete(c, p)),
        2 => (0..12usize, any::<bool>()).prop_map(|(p, ok)| Cmd::Deleted(p, ok)),
        1 => (0..USERS.len(), 0..3u32).prop_map(|(u, n)| Cmd::Limit(u, n)),
    ]
}

/// An id: the `i`-th (cyclically) of the objects that satisfy `pred`, or one that does not
/// exist. Picking among the objects a command suits keeps random runs reaching deep states.
fn pick(b: &Book, i: usize, pred: impl Fn(&Object) -> bool) -> u64 {
    let ids: Vec<u64> = b.objects().filter(|o| pred(o)).map(|o| o.id).collect();
    if ids.is_empty() || i % 7 == 6 { 1000 + i as u64 } else { ids[i % ids.len()] }
}

/// Apply one command as the service would; the ids of objects the command changed.
fn apply(b: &mut Book, next: &mut u64, c: &Cmd) -> Option<(Caller, Vec<u64>)> {
    let set = |b: &mut Book, id: u64, phase: Phase| {
        let mut o = b.object(id).cloned().expect("object");
        o.phase = phase;
        b.insert(o);
    };
    match c.clone() {
        Cmd::Base => {
            *next += 1;
            b.insert(obj(*next, Kind::Baseimage, ADMIN_OWNER, None, Phase::Create));
            Some((Caller::Admin, vec![*next]))
        }
        Cmd::Derive(w, kind, p) => {
            let parent = pick(b, p, |o| Some(o.kind) == kind.parent());
            let who = caller(w, b, parent);
            let owner = b.check_derive(&who, kind, parent).ok()?;
            if let (Kind::Environment, Some(max)) = (kind, b.limit(&owner)) {
                let held = b.objects().filter(|o| o.kind == Kind::Environment && o.owner == owner).count() as u32;
                assert!(held < max, "an environment beyond {owner}'s limit {max}");
            }
            *next += 1;
            b.insert(obj(*next, kind, &owner, Some(parent), Phase::Create));
            Some((who, vec![*next]))
        }
        Cmd::Advance(p) => {
            let id = pick(b, p, |o| o.phase.automatic());
            // Only a running step finishes, and steps run only in automatic live phases.
            let o = b.object(id)?;
            if !o.phase.automatic() || o.phase == Phase::Deleting {
                return None;
            }
            let phase = b.check_advance(id).ok()?;
            set(b, id, phase);
            Some((Caller::Admin, vec![id]))
        }
        Cmd::Fail(p) => {
            let id = pick(b, p, |o| o.phase.automatic());
            b.object(id).filter(|o| o.phase.automatic())?;
            set(b, id, Phase::Failed);
            Some((Caller::Admin, vec![id]))
        }
        Cmd::Done(w, p) => {
            let id = pick(b, p, |o| p % 2 == 1 || o.phase == Phase::ConfigInteractive);
            let who = caller(w, b, id);
            let kind = b.object(id)?.kind;
            let phase = b.check_done(&who, kind, id).ok()?;
            set(b, id, phase);
            Some((who, vec![id]))
        }
        Cmd::Delete(w, p) => {
            let id = pick(b, p, |_| true);
            let who = caller(w, b, id);
            let kind = b.object(id)?.kind;
            b.check_delete(&who, kind, id).ok()?;
            set(b, id, Phase::Deleting);
            Some((who, vec![id]))
        }
        Cmd::Deleted(p, ok) => {
            let id = pick(b, p, |o| o.phase == Phase::Deleting);
            b.object(id).filter(|o| o.phase == Phase::Deleting)?;
            if ok {
                b.remove(id);
            } else {
                set(b, id, Phase::Failed);
            }
            Some((Caller::Admin, vec![id]))
        }
        Cmd::Limit(u, n) => {
            b.set_limit(USERS[u], n);
            None
        }
    }
}

proptest! {
    // Deep states (an app on a ready deployment) need long runs; enough cases reach them.
    #![proptest_config(ProptestConfig::with_cases(1024))]
    #[test]
    fn random_commands_never_go_backwards_or_across_users(cmds in proptest::collection::vec(cmd(), 1..200)) {
        let mut b = Book::new([], USERS.iter().map(|u| (u.to_string(), 1)));
        let mut next = 0;
        for c in &cmds {
            let before = b.clone();
            let Some((who, touched)) = apply(&mut b, &mut next, c) else {
                let same: Vec<&Object> = b.objects().collect();
                prop_assert_eq!(same, before.objects().collect::<Vec<_>>(), "a refused command changed nothing");
                continue;
            };
            for o in before.objects() {
                if let Some(now) = b.object(o.id) {
                    prop_assert!(now.phase == o.phase || forward(o.phase, now.phase), "{:?}: {:?} → {:?}", c, o.phase, now.phase);
                    prop_assert_eq!(&now.owner, &o.owner);
                    prop_assert_eq!(now.parent, o.parent);
                }
            }
            for id in touched {
                if let (Caller::User(u), Some(o)) = (&who, b.object(id)) {
                    prop_assert_eq!(&o.owner, u, "{:?} touched another user's object", c);
                }
            }
            for o in b.objects() {
                let parent = o.parent.and_then(|p| b.object(p));
                prop_assert_eq!(o.parent.is_some(), parent.is_some(), "a parent outlived by its child");
                if let Some(p) = parent.filter(|p| p.kind != Kind::Baseimage) {
                    prop_assert_eq!(&o.owner, &p.owner, "derived across users");
                }
            }
        }
    }
}
