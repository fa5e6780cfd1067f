//! `MigrationStore` against both stores (`each_store!`): endpoints with names unique per role,
//! resource reports replacing a source's list (also two at once), migrations with the status
//! check on update and deletion only once finished, and every write seen by a second store
//! opened on the same database.

use serde_json::json;

use super::*;
use crate::domain::migration::{Attempt, MigrationInput};
use crate::store::open;
use crate::store::test_stores::each_store;

fn source(name: &str) -> Endpoint {
    Endpoint::new(Role::Source, name.into(), "libvirt".into(), json!({"uri": "qemu+ssh://root@h/system", "password": "pw"}))
}

fn found(at: &str, name: &str) -> Discovered {
    Discovered { id_at_source: at.into(), kind: ResourceKind::Instance, name: name.into(), properties: json!({"disks": 1}) }
}

fn names(rs: &[Resource]) -> Vec<(&str, &str, bool)> {
    rs.iter().map(|r| (r.id_at_source.as_str(), r.name.as_str(), r.migrated)).collect()
}

each_store! {
    #[tokio::test]
    async fn endpoints_have_names_unique_per_role(t) {
        let s = t.store.migrations().expect("both stores hold migration rows");
        let mut src = source("kvm1");
        src.id = s.insert_endpoint(&src).await.unwrap().expect("a new name");
        assert_eq!(s.insert_endpoint(&source("kvm1")).await.unwrap(), None, "taken for sources");
        let mut dst = Endpoint { role: Role::Destination, kind: "hive".into(), ..source("kvm1") };
        dst.id = s.insert_endpoint(&dst).await.unwrap().expect("a destination may share a source's name");
        assert!(dst.id > src.id);
        let other = s.insert_endpoint(&source("kvm2")).await.unwrap().unwrap();

        let renamed = Endpoint { id: other, ..source("kvm1") };
        assert_eq!(s.update_endpoint(&renamed).await.unwrap(), EndpointUpdate::NameTaken);
        assert_eq!(s.update_endpoint(&Endpoint { id: 999, ..source("x") }).await.unwrap(), EndpointUpdate::NotFound);
        src.params = json!({"uri": "qemu:///system"});
        src.kind = "file".into();
        assert_eq!(s.update_endpoint(&src).await.unwrap(), EndpointUpdate::Done);

        src.heartbeat(true, 4, 1_000);
        assert!(s.set_endpoint_health(&src).await.unwrap());
        let stale = Endpoint { state: EndpointState::Down, last_seen: Some(900), checked_by: Some(5), ..src.clone() };
        assert!(!s.set_endpoint_health(&stale).await.unwrap(), "an older heartbeat does not overwrite a newer one");
        let edited = Endpoint { params: json!({"edited": true}), ..stale };
        assert!(s.set_endpoint_health(&Endpoint { last_seen: Some(2_000), ..edited }).await.unwrap());
        let got = s.endpoint(src.id).await.unwrap().unwrap();
        assert_eq!((got.state, got.last_seen, got.checked_by), (EndpointState::Down, Some(2_000), Some(5)));
        assert_eq!(got.params, json!({"uri": "qemu:///system"}), "a heartbeat leaves the parameters alone");
        assert_eq!(got.kind, "file");

        let all = s.endpoints().await.unwrap();
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![src.id, dst.id, other]);
        assert!(s.delete_endpoint(other).await.unwrap());
        assert!(!s.delete_endpoint(other).await.unwrap());
        let again = s.insert_endpoint(&source("kvm2")).await.unwrap().unwrap();
        assert!(again > other, "ids are never reused");
    }
}

each_store! {
    #[tokio::test]
    async fn a_report_replaces_a_sources_resources(t) {
        let s = t.store.migrations().unwrap();
        let src = s.insert_endpoint(&source("kvm")).await.unwrap().unwrap();
        let dst = s.insert_endpoint(&Endpoint { role: Role::Destination, ..source("hive") }).await.unwrap().unwrap();
        assert_eq!(s.replace_resources(dst, vec![found("a", "web")]).await.unwrap(), None, "a destination holds no resources");
        assert_eq!(s.replace_resources(999, vec![]).await.unwrap(), None);

        let first = s.replace_resources(src, vec![found("a", "web"), found("b", "db"), found("c", "cache")]).await.unwrap().unwrap();
        assert_eq!(first.added.len(), 3);
        assert!(first.added.iter().all(|r| r.id > 0 && r.source_id == src));
        let web = first.added.iter().find(|r| r.id_at_source == "a").unwrap().id;
        assert!(s.set_resource_migrated(web, true).await.unwrap());
        assert!(!s.set_resource_migrated(999, true).await.unwrap());

        let second = s.replace_resources(src, vec![found("a", "web"), found("b", "db-renamed"), found("d", "new")]).await.unwrap().unwrap();
        assert_eq!(names(&second.updated), vec![("b", "db-renamed", false)]);
        assert_eq!(names(&second.removed), vec![("c", "cache", false)]);
        assert_eq!(names(&second.added), vec![("d", "new", false)]);
        let now = s.resources(Some(src)).await.unwrap();
        assert_eq!(names(&now), vec![("a", "web", true), ("b", "db-renamed", false), ("d", "new", false)]);
        assert_eq!(now[0].id, web, "a resource keeps its id and migrated flag across reports");
        assert_eq!(s.resource(web).await.unwrap().unwrap(), now[0]);
        assert!(s.replace_resources(src, vec![found("a", "web"), found("b", "db-renamed"), found("d", "new")]).await.unwrap().unwrap().is_empty());

        let other = s.insert_endpoint(&source("vbox")).await.unwrap().unwrap();
        s.replace_resources(other, vec![found("a", "same id elsewhere")]).await.unwrap().unwrap();
        assert_eq!(s.resources(None).await.unwrap().len(), 4);
        assert!(s.delete_endpoint(src).await.unwrap());
        assert_eq!(names(&s.resources(None).await.unwrap()), vec![("a", "same id elsewhere", false)], "a source's resources go with it");
    }
}

each_store! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_reports_at_once_apply_one_after_the_other(t) {
        let s = t.store.migrations().unwrap();
        let src = s.insert_endpoint(&source("kvm")).await.unwrap().unwrap();
        let one = vec![found("x", "from one"), found("y", "y")];
        let two = vec![found("x", "from two"), found("z", "z")];
        for _ in 0..10 {
            s.replace_resources(src, vec![]).await.unwrap().unwrap();
            let (a, b) = tokio::join!(s.replace_resources(src, one.clone()), s.replace_resources(src, two.clone()));
            a.expect("first report");
            b.expect("second report");
            let got = names(&s.resources(Some(src)).await.unwrap()).into_iter().map(|(a, n, _)| (a.to_string(), n.to_string())).collect::<Vec<_>>();
            let as_list = |l: &[Discovered]| l.iter().map(|d| (d.id_at_source.clone(), d.name.clone())).collect::<Vec<_>>();
            assert!(got == as_list(&one) || got == as_list(&two), "a mix of two reports: {got:?}");
        }
    }
}

each_store! {
    #[tokio::test]
    async fn migrations_round_trip_and_check_their_status(t) {
        let s = t.store.migrations().unwrap();
        let mut m = Migration::new("move web".into(), "to the hive".into(), 3, u64::MAX - 1, 1_000);
        m.id = s.insert_migration(&m).await.unwrap();
        assert_eq!(s.migration(m.id).await.unwrap().unwrap(), m);
        assert!(!s.delete_migration(m.id).await.unwrap(), "a running migration is not deleted");

        let before = m.status;
        m.apply(MigrationInput::Scheduled { node: 2 }, 1_100).unwrap();
        m.apply(MigrationInput::StepFailed { node: 2, error: "disk full".into(), retryable: true }, 1_200).unwrap();
        m.apply(MigrationInput::Scheduled { node: 5 }, 1_300).unwrap();
        m.apply(MigrationInput::Step { node: 5, event: Event::ConvertingDisks, step_progress: 50 }, 1_400).unwrap();
        assert!(s.update_migration(&m, before).await.unwrap());
        let got = s.migration(m.id).await.unwrap().unwrap();
        assert_eq!(got, m);
        assert_eq!(got.attempts, vec![Attempt { node: 2, error: "disk full".into(), at: 1_200 }]);
        assert_eq!((got.event, got.progress, got.worker), (Event::ConvertingDisks, 55, Some(5)));

        let mut cancelled = m.clone();
        cancelled.apply(MigrationInput::Cancel, 1_500).unwrap();
        assert!(s.update_migration(&cancelled, Status::Inprogress).await.unwrap());
        let mut late = m.clone();
        late.apply(MigrationInput::Completed { node: 5, result: json!({"image": "web"}) }, 1_600).unwrap();
        assert!(!s.update_migration(&late, Status::Inprogress).await.unwrap(), "the cancel won; the late completion is refused");
        assert_eq!(s.migration(m.id).await.unwrap().unwrap().status, Status::Cancelled);
        assert!(!s.update_migration(&Migration { id: 999, ..late.clone() }, Status::Inprogress).await.unwrap());

        let mut done = Migration::new("b".into(), String::new(), 4, 1, 2_000);
        done.id = s.insert_migration(&done).await.unwrap();
        done.apply(MigrationInput::Scheduled { node: 1 }, 2_001).unwrap();
        done.apply(MigrationInput::Completed { node: 1, result: json!({"image": "b", "vm": 7}) }, 2_002).unwrap();
        assert!(s.update_migration(&done, Status::Initiating).await.unwrap());
        assert_eq!(s.migrations().await.unwrap(), vec![cancelled, done.clone()]);

        assert!(s.delete_migration(m.id).await.unwrap());
        assert!(!s.delete_migration(m.id).await.unwrap());
        assert_eq!(s.migration(m.id).await.unwrap(), None);
        let next = s.insert_migration(&done).await.unwrap();
        assert!(next > done.id, "ids are never reused");
    }
}

each_store! {
    #[tokio::test]
    async fn writes_are_seen_by_another_store_on_the_same_database(t) {
        let s = t.store.migrations().unwrap();
        let src = s.insert_endpoint(&source("kvm")).await.unwrap().unwrap();
        s.replace_resources(src, vec![found("a", "web")]).await.unwrap().unwrap();
        let mut m = Migration::new("m".into(), String::new(), 1, 2, 10);
        m.id = s.insert_migration(&m).await.unwrap();

        let reopened = open(&t.url).await.unwrap();
        let r = reopened.migrations().unwrap();
        assert_eq!(r.endpoints().await.unwrap(), s.endpoints().await.unwrap());
        assert_eq!(r.endpoint(src).await.unwrap().unwrap().params["password"], "pw", "workers need the secret to connect");
        assert_eq!(names(&r.resources(None).await.unwrap()), vec![("a", "web", false)]);
        assert_eq!(r.migrations().await.unwrap(), vec![m]);
    }
}

#[test]
fn the_finished_list_matches_the_domain() {
    let finished: Vec<String> = Status::ALL.iter().filter(|s| s.is_finished()).map(|s| format!("'{}'", s.name())).collect();
    assert_eq!(FINISHED, format!("({})", finished.join(", ")));
}
