//! Unit tests of the migration rules, endpoints, reconciliation and the scheduler, and property
//! tests: random report sequences never lower progress within an attempt, never run more than
//! `MAX_ATTEMPTS` attempts, never change a finished migration, and refused inputs change nothing.

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn mig() -> Migration {
    Migration { id: 9, ..Migration::new("m".into(), "d".into(), 4, 2, 1_000) }
}

fn step(node: NodeId, event: Event, p: u8) -> MigrationInput {
    MigrationInput::Step { node, event, step_progress: p }
}

fn lost(node: NodeId, why: &str) -> MigrationInput {
    MigrationInput::WorkerFailed { node, error: why.into() }
}

fn running(node: NodeId) -> Migration {
    let mut m = mig();
    m.apply(MigrationInput::Scheduled { node }, 1_001).unwrap();
    m
}

#[test]
fn a_new_migration_waits_for_a_worker() {
    let m = mig();
    assert_eq!((m.status, m.event, m.progress, m.worker), (Status::Initiating, Event::Scheduling, 0, None));
    assert_eq!(m.start_effects(), vec![MigrationEffect::Schedule { tried: vec![] }]);
    assert!(!m.is_finished());
}

#[test]
fn a_migration_walks_every_step_to_completed() {
    let mut m = mig();
    assert_eq!(m.apply(MigrationInput::Scheduled { node: 3 }, 1_100).unwrap(), vec![MigrationEffect::Start { node: 3 }]);
    assert_eq!((m.status, m.event, m.worker), (Status::Inprogress, Event::ConnectingToSource, Some(3)));
    let expected = [
        (Event::ConnectingToSource, 100, 5),
        (Event::FetchingDisks, 50, 20),
        (Event::ConvertingDisks, 0, 35),
        (Event::ConvertingDisks, 50, 55),
        (Event::UploadingToDestination, 100, 90),
        (Event::BootingInstance, 50, 95),
    ];
    for (i, (event, p, overall)) in expected.into_iter().enumerate() {
        assert_eq!(m.apply(step(3, event, p), 1_200 + i as u64).unwrap(), vec![]);
        assert_eq!((m.event, m.progress), (event, overall), "{event:?} at {p}%");
    }
    let effects = m.apply(MigrationInput::Completed { node: 3, result: json!({"image": "web-1"}) }, 2_000).unwrap();
    assert_eq!(effects, vec![MigrationEffect::MarkMigrated { resource_id: 4 }]);
    assert_eq!((m.status, m.event, m.progress), (Status::Completed, Event::Done, 100));
    assert_eq!(m.result, Some(json!({"image": "web-1"})));
    assert_eq!((m.created_at, m.updated_at), (1_000, 2_000));
    assert!(m.is_finished());
    assert_eq!(m.check_delete(), Ok(()));
}

#[test]
fn progress_never_decreases_within_an_attempt() {
    let mut m = running(1);
    m.apply(step(1, Event::ConvertingDisks, 50), 2).unwrap();
    m.apply(step(1, Event::ConvertingDisks, 10), 3).unwrap();
    assert_eq!(m.progress, 55, "a late, lower report leaves progress alone");
    m.apply(step(1, Event::ConvertingDisks, 250), 4).unwrap();
    assert_eq!(m.progress, 75, "step progress is clamped to the step's share");
}

#[test]
fn a_worker_cannot_go_back_a_step_or_report_the_hives_events() {
    let mut m = running(1);
    m.apply(step(1, Event::ConvertingDisks, 10), 2).unwrap();
    let before = m.clone();
    let err = m.apply(step(1, Event::FetchingDisks, 90), 3).unwrap_err();
    assert_eq!(err, MigrationRuleError::StepBackwards { id: 9, from: Event::ConvertingDisks, to: Event::FetchingDisks });
    assert_eq!(m.apply(step(1, Event::Done, 0), 3).unwrap_err(), MigrationRuleError::NotAStep { event: Event::Done });
    assert_eq!(m.apply(step(1, Event::Scheduling, 0), 3).unwrap_err(), MigrationRuleError::NotAStep { event: Event::Scheduling });
    assert_eq!(m, before, "refusals change nothing");
}

#[test]
fn only_the_current_worker_is_heard() {
    let mut m = running(1);
    let before = m.clone();
    let err = m.apply(step(2, Event::FetchingDisks, 10), 2).unwrap_err();
    assert_eq!(err, MigrationRuleError::NotWorker { id: 9, node: 2, worker: Some(1) });
    assert_eq!(err.to_string(), "node 2 is not the worker of migration 9 (its worker is node 1)");
    assert!(m.apply(MigrationInput::Completed { node: 2, result: json!(null) }, 2).is_err());
    assert_eq!(m, before);
}

#[test]
fn reports_before_scheduling_are_refused_naming_the_status() {
    let mut m = mig();
    let err = m.apply(step(1, Event::FetchingDisks, 10), 2).unwrap_err();
    assert_eq!(
        err,
        MigrationRuleError::BadTransition { id: 9, status: Status::Initiating, event: Event::Scheduling, asked: "a step report" }
    );
    assert_eq!(err.to_string(), "migration 9 is Initiating (Scheduling); a step report is not possible now");
    let mut r = running(1);
    assert!(matches!(
        r.apply(MigrationInput::Scheduled { node: 2 }, 2),
        Err(MigrationRuleError::BadTransition { status: Status::Inprogress, .. })
    ));
}

#[test]
fn a_lost_worker_is_retried_on_another_node_from_the_start() {
    let mut m = running(1);
    m.apply(step(1, Event::ConvertingDisks, 50), 2).unwrap();
    let effects = m.apply(lost(1, "node 1 disconnected"), 3).unwrap();
    assert_eq!(effects, vec![MigrationEffect::Stop { node: 1 }, MigrationEffect::Schedule { tried: vec![1] }]);
    assert_eq!((m.status, m.event, m.progress, m.worker), (Status::Inprogress, Event::Scheduling, 0, None));
    assert_eq!(m.attempts, vec![Attempt { node: 1, error: "node 1 disconnected".into(), at: 3 }]);
    assert_eq!(m.apply(MigrationInput::Scheduled { node: 1 }, 4).unwrap_err(), MigrationRuleError::AlreadyTried { id: 9, node: 1 });
    assert_eq!(m.apply(MigrationInput::Scheduled { node: 2 }, 4).unwrap(), vec![MigrationEffect::Start { node: 2 }]);
    assert!(
        matches!(m.apply(step(1, Event::BootingInstance, 1), 5), Err(MigrationRuleError::NotWorker { .. })),
        "the old worker's late report"
    );
    m.apply(step(2, Event::FetchingDisks, 0), 5).unwrap();
    assert_eq!(m.progress, 5);
}

#[test]
fn after_four_attempts_the_migration_ends_in_error_with_the_last_cause() {
    let mut m = mig();
    for node in 1..=4 {
        m.apply(MigrationInput::Scheduled { node }, node).unwrap();
        let effects = m.apply(MigrationInput::StepFailed { node, error: format!("disk full on {node}"), retryable: true }, node).unwrap();
        if node < 4 {
            assert_eq!(effects, vec![MigrationEffect::Schedule { tried: (1..=node).collect() }]);
        } else {
            assert_eq!(effects, vec![]);
        }
    }
    assert_eq!(m.status, Status::Error);
    assert_eq!(m.error.as_deref(), Some("disk full on 4"));
    assert_eq!(m.attempts.len(), MAX_ATTEMPTS);
    assert_eq!(
        m.apply(MigrationInput::Scheduled { node: 5 }, 9).unwrap_err(),
        MigrationRuleError::Finished { id: 9, status: Status::Error }
    );
}

#[test]
fn a_non_retryable_failure_ends_at_once() {
    let mut m = running(1);
    m.apply(step(1, Event::ConvertingDisks, 5), 2).unwrap();
    let effects =
        m.apply(MigrationInput::StepFailed { node: 1, error: "qemu-img: source.vmdk: not a vmdk".into(), retryable: false }, 3).unwrap();
    assert_eq!(effects, vec![]);
    assert_eq!((m.status, m.event), (Status::Error, Event::ConvertingDisks), "the event says where it failed");
    assert_eq!(m.error.as_deref(), Some("qemu-img: source.vmdk: not a vmdk"));
    assert_eq!(m.attempts.len(), 1);
}

#[test]
fn cancel_stops_the_worker_and_only_unfinished_ones() {
    let mut waiting = mig();
    assert_eq!(waiting.apply(MigrationInput::Cancel, 5).unwrap(), vec![]);
    assert_eq!(waiting.status, Status::Cancelled);

    let mut m = running(7);
    assert_eq!(m.apply(MigrationInput::Cancel, 5).unwrap(), vec![MigrationEffect::Stop { node: 7 }]);
    assert_eq!((m.status, m.worker), (Status::Cancelled, Some(7)));
    let err = m.apply(MigrationInput::Cancel, 6).unwrap_err();
    assert_eq!(err.to_string(), "migration 9 is Cancelled; it does not change any more");

    let mut between = running(1);
    between.apply(lost(1, "gone"), 2).unwrap();
    assert_eq!(between.apply(MigrationInput::Cancel, 3).unwrap(), vec![], "no worker runs it between attempts");

    let mut done = running(1);
    done.apply(MigrationInput::Completed { node: 1, result: json!("img") }, 2).unwrap();
    assert_eq!(done.apply(MigrationInput::Cancel, 3).unwrap_err(), MigrationRuleError::Finished { id: 9, status: Status::Completed });
}

#[test]
fn unschedulable_ends_in_error_naming_the_reason_and_the_last_failure() {
    let mut first = mig();
    first.apply(MigrationInput::Unschedulable { reason: NoWorker::NoneUp.to_string() }, 2).unwrap();
    assert_eq!((first.status, first.error.as_deref()), (Status::Error, Some("no node is up and accepting migrations")));

    let mut m = running(1);
    assert!(m.apply(MigrationInput::Unschedulable { reason: "x".into() }, 2).is_err(), "a running one is not waiting");
    m.apply(lost(1, "agent gone"), 2).unwrap();
    m.apply(MigrationInput::Unschedulable { reason: "all tried".into() }, 3).unwrap();
    assert_eq!(m.error.as_deref(), Some("all tried; the last attempt failed on node 1: agent gone"));
}

#[test]
fn only_finished_migrations_may_be_deleted() {
    let m = running(1);
    let err = m.check_delete().unwrap_err();
    assert_eq!(err, MigrationRuleError::NotFinished { id: 9, status: Status::Inprogress });
    assert!(err.to_string().contains("Inprogress"));
}

#[test]
fn names_on_the_wire_match_the_spec() {
    let statuses: Vec<String> = Status::ALL.iter().map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_string()).collect();
    assert_eq!(statuses, ["Initiating", "Inprogress", "Completed", "Error", "Cancelled"]);
    let events: Vec<String> = Event::ALL.iter().map(|e| serde_json::to_value(e).unwrap().as_str().unwrap().to_string()).collect();
    assert_eq!(
        events,
        [
            "Scheduling",
            "Connecting to source",
            "Fetching disk(s)",
            "Converting disk(s)",
            "Uploading to destination",
            "Booting instance",
            "done"
        ]
    );
    for e in Event::ALL {
        assert_eq!(e.label(), serde_json::to_value(e).unwrap().as_str().unwrap());
        assert_eq!(Event::from_code(e.code()), Some(e));
    }
    for s in Status::ALL {
        assert_eq!(Status::parse(s.name()), Some(s));
    }
    assert_eq!(serde_json::from_value::<Event>(json!("Fetching disks")).unwrap(), Event::FetchingDisks, "the issue's spelling");
    assert_eq!(serde_json::from_value::<Event>(json!("Converting disks")).unwrap(), Event::ConvertingDisks);

    let mut m = running(1);
    m.apply(lost(1, "x"), 2).unwrap();
    let back: Migration = serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
    assert_eq!(back, m);
}

#[test]
fn step_spans_cover_the_bar_in_order() {
    let steps: Vec<Event> = Event::ALL.into_iter().filter(|e| e.is_worker_step()).collect();
    assert_eq!(steps.first().unwrap().span().0, 0);
    assert_eq!(steps.last().unwrap().span().1, 100);
    for w in steps.windows(2) {
        assert_eq!(w[0].span().1, w[1].span().0, "{:?} then {:?}", w[0], w[1]);
    }
}

// ---- endpoints and resources --------------------------------------------------------------

fn endpoint() -> Endpoint {
    Endpoint::new(Role::Source, "esx".into(), "vmware".into(), json!({"host": "10.0.0.1", "user": "root", "password": "pw"}))
}

#[test]
fn heartbeats_set_the_state_and_silence_makes_it_down() {
    let mut e = endpoint();
    assert_eq!(e.effective_state(0, 10), EndpointState::Unknown);
    assert!(e.heartbeat(true, 3, 100));
    assert_eq!((e.state, e.last_seen, e.checked_by), (EndpointState::Up, Some(100), Some(3)));
    assert!(!e.heartbeat(true, 4, 105), "same state, nothing changed");
    assert_eq!(e.checked_by, Some(4));
    assert!(!e.heartbeat(false, 5, 90), "an older report is ignored");
    assert_eq!((e.state, e.last_seen), (EndpointState::Up, Some(105)));
    assert_eq!(e.effective_state(115, 10), EndpointState::Up, "exactly the window is not stale");
    assert_eq!(e.effective_state(116, 10), EndpointState::Down);
    assert!(e.heartbeat(false, 5, 120));
    assert_eq!(e.effective_state(121, 10), EndpointState::Down);
}

#[test]
fn secrets_never_leave_redacted() {
    let mut e = endpoint();
    e.params = json!({
        "host": "h", "user": "root", "password": "pw1",
        "auth": {"apiKey": "k2", "client_secret": "s3", "ssh-private-key": "k4", "keyboard": "us"},
        "disks": [{"url": "https://bob:pw5@files.example/disk.vmdk", "token": "t6"}],
        "uri": "vpx://admin@vc/dc", "passphrase": null
    });
    let r = e.redacted();
    assert_eq!(
        r.params,
        json!({
            "host": "h", "user": "root", "password": "***",
            "auth": {"apiKey": "***", "client_secret": "***", "ssh-private-key": "***", "keyboard": "us"},
            "disks": [{"url": "https://bob:***@files.example/disk.vmdk", "token": "***"}],
            "uri": "vpx://admin@vc/dc", "passphrase": null
        })
    );
    assert_eq!(e.params["password"], "pw1", "the original keeps its secrets");
    let shown = format!("{e:?}");
    for secret in ["pw1", "k2", "s3", "k4", "pw5", "t6"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(known_driver("hyperv") && !known_driver("xen"));
}

fn res(id: u64, source_id: u64, at: &str, name: &str, migrated: bool) -> Resource {
    Resource { id, source_id, id_at_source: at.into(), kind: ResourceKind::Instance, name: name.into(), properties: json!({}), migrated }
}

fn found(at: &str, name: &str) -> Discovered {
    Discovered { id_at_source: at.into(), kind: ResourceKind::Instance, name: name.into(), properties: json!({}) }
}

#[test]
fn a_report_replaces_the_list_keeping_ids_and_migrated_flags() {
    let existing =
        vec![res(1, 7, "a", "web", true), res(2, 7, "b", "db", false), res(3, 7, "c", "old", true), res(4, 8, "z", "other", false)];
    let diff = reconcile(7, &existing, vec![found("b", "db2"), found("a", "web"), found("d", "new"), found("d", "newer")]);
    assert_eq!(diff.updated, vec![res(2, 7, "b", "db2", false)]);
    assert_eq!(diff.added, vec![res(0, 7, "d", "newer", false)], "of duplicates the last counts");
    assert_eq!(diff.removed, vec![res(3, 7, "c", "old", true)], "other sources' rows are left alone");

    let mut changed = found("a", "web");
    changed.properties = json!({"disks": 2});
    let diff = reconcile(7, &existing[..1], vec![changed]);
    assert_eq!(diff.updated.len(), 1);
    assert!(diff.updated[0].migrated, "the flag survives an update");
    assert!(reconcile(7, &existing[..1], vec![found("a", "web")]).is_empty());
}

// ---- scheduler ----------------------------------------------------------------------------

fn cand(node: NodeId, free: u64) -> WorkerCandidate {
    WorkerCandidate { node, free_conversion_bytes: free, up: true, accepts_migrations: true }
}

#[test]
fn the_most_free_space_wins_ties_by_lowest_id() {
    let c = [cand(3, 50), cand(1, 80), cand(2, 80), cand(4, 90)];
    assert_eq!(choose_worker(&c, 10, &[]), Ok(4));
    assert_eq!(choose_worker(&c, 10, &[4]), Ok(1));
    assert_eq!(choose_worker(&c, 10, &[4, 1]), Ok(2));
    let down = [WorkerCandidate { up: false, ..cand(9, 1000) }, WorkerCandidate { accepts_migrations: false, ..cand(8, 1000) }, cand(1, 5)];
    assert_eq!(choose_worker(&down, 5, &[]), Ok(1));
}

#[test]
fn no_worker_says_why() {
    assert_eq!(choose_worker(&[], 1, &[]), Err(NoWorker::NoneUp));
    assert_eq!(choose_worker(&[WorkerCandidate { up: false, ..cand(1, 9) }], 1, &[]), Err(NoWorker::NoneUp));
    let c = [cand(1, 100), cand(2, 300)];
    assert_eq!(choose_worker(&c, 1, &[1, 2]), Err(NoWorker::AllTried { tried: 2 }));
    let err = choose_worker(&c, 500, &[]).unwrap_err();
    assert_eq!(err, NoWorker::NotEnoughSpace { best_node: 2, best_free: 300, needed: 500 });
    assert_eq!(err.to_string(), "not enough conversion space: the best node, 2, has 300 bytes free; the job needs 500");
    assert!(err.may_change() && !NoWorker::AllTried { tried: 2 }.may_change());
}

// ---- properties ---------------------------------------------------------------------------

fn input() -> impl Strategy<Value = MigrationInput> {
    let node = 1u64..6;
    let event = proptest::sample::select(Event::ALL.to_vec());
    // Weighted so that long runs reach the deep states: the last attempt, a completion after
    // retries, a cancel late in a conversion.
    prop_oneof![
        3 => node.clone().prop_map(|node| MigrationInput::Scheduled { node }),
        1 => Just(MigrationInput::Unschedulable { reason: "none".into() }),
        6 => (node.clone(), event, 0u8..=120).prop_map(|(node, event, p)| MigrationInput::Step { node, event, step_progress: p }),
        2 => (node.clone(), proptest::bool::weighted(0.8))
            .prop_map(|(node, retryable)| MigrationInput::StepFailed { node, error: "e".into(), retryable }),
        2 => node.clone().prop_map(|node| MigrationInput::WorkerFailed { node, error: "lost".into() }),
        1 => node.prop_map(|node| MigrationInput::Completed { node, result: json!("img") }),
        1 => Just(MigrationInput::Cancel),
    ]
}

/// Inputs that mostly make sense: most reports come from the current worker.
fn aimed(m: &Migration, raw: MigrationInput, aim: bool) -> MigrationInput {
    let Some(w) = m.worker.filter(|_| aim) else { return raw };
    match raw {
        MigrationInput::Step { event, step_progress, .. } => MigrationInput::Step { node: w, event, step_progress },
        MigrationInput::StepFailed { error, retryable, .. } => MigrationInput::StepFailed { node: w, error, retryable },
        MigrationInput::WorkerFailed { error, .. } => MigrationInput::WorkerFailed { node: w, error },
        MigrationInput::Completed { result, .. } => MigrationInput::Completed { node: w, result },
        other => other,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]
    #[test]
    fn random_reports_keep_the_invariants(inputs in proptest::collection::vec((input(), proptest::bool::weighted(0.8)), 1..80)) {
        let mut m = mig();
        for (t, (raw, aim)) in inputs.into_iter().enumerate() {
            let inp = aimed(&m, raw, aim);
            let before = m.clone();
            let now = 2_000 + t as u64;
            match m.apply(inp.clone(), now) {
                Err(_) => prop_assert_eq!(&m, &before, "a refused {:?} changed the migration", inp),
                Ok(effects) => {
                    prop_assert!(!before.is_finished(), "a finished migration changed on {:?}", inp);
                    prop_assert_eq!(m.updated_at, now);
                    if m.status == Status::Cancelled {
                        prop_assert!(matches!(before.status, Status::Initiating | Status::Inprogress));
                        prop_assert_eq!(&inp, &MigrationInput::Cancel);
                    }
                    if m.attempts.len() == before.attempts.len() && m.status != Status::Completed {
                        prop_assert!(m.progress >= before.progress, "progress fell from {} to {} on {:?}", before.progress, m.progress, inp);
                    }
                    if let MigrationInput::Scheduled { node } = inp {
                        prop_assert!(!before.tried_nodes().contains(&node), "a retry ran on a node already tried");
                        prop_assert_eq!(effects, vec![MigrationEffect::Start { node }]);
                    }
                }
            }
            prop_assert!(m.attempts.len() <= MAX_ATTEMPTS);
            prop_assert!(m.progress <= 100);
            prop_assert!(before.status == Status::Initiating || m.status != Status::Initiating, "back to Initiating");
            prop_assert_eq!(m.status == Status::Completed, m.event == Event::Done);
            if m.status == Status::Completed {
                prop_assert_eq!(m.progress, 100);
                prop_assert!(m.result.is_some());
            }
            if m.status == Status::Error {
                prop_assert!(m.error.is_some());
            }
            if m.status == Status::Inprogress {
                prop_assert_eq!(m.worker.is_some(), m.event != Event::Scheduling);
            }
            let mut nodes = m.tried_nodes();
            nodes.sort_unstable();
            nodes.dedup();
            prop_assert_eq!(nodes.len(), m.attempts.len(), "two attempts on one node");
        }
    }

    #[test]
    fn the_chosen_worker_is_eligible_and_has_the_most_space(
        nodes in proptest::sample::subsequence((1u64..12).collect::<Vec<_>>(), 0..10).prop_shuffle(),
        attrs in proptest::collection::vec((0u64..1000, proptest::bool::weighted(0.8), proptest::bool::weighted(0.9)), 10),
        needed in 0u64..800,
        tried in proptest::collection::vec(1u64..12, 0..4),
    ) {
        // Node ids are distinct, as the registry's are.
        let cands: Vec<WorkerCandidate> = nodes.into_iter().zip(attrs)
            .map(|(node, (free, up, acc))| WorkerCandidate { node, free_conversion_bytes: free, up, accepts_migrations: acc })
            .collect();
        let eligible: Vec<&WorkerCandidate> = cands.iter().filter(|c| c.up && c.accepts_migrations && !tried.contains(&c.node)).collect();
        match choose_worker(&cands, needed, &tried) {
            Ok(node) => {
                let c = eligible.iter().find(|c| c.node == node);
                prop_assert!(c.is_some(), "chose ineligible node {}", node);
                let c = c.unwrap();
                prop_assert!(c.free_conversion_bytes >= needed);
                for o in &eligible {
                    prop_assert!(o.free_conversion_bytes < c.free_conversion_bytes
                        || (o.free_conversion_bytes == c.free_conversion_bytes && o.node >= c.node));
                }
            }
            Err(_) => prop_assert!(eligible.iter().all(|c| c.free_conversion_bytes < needed)),
        }
    }
}
