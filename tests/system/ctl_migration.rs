//! `hive ctl migration`: the real binary against a hive on port 0 registers a source and a
//! destination, lists them, and reports the hive's refusal of a migration with a non-zero exit;
//! `--wait` follows a migration to its end and exits non-zero when it did not complete.

use guaca_hive::domain::migration::{Discovered, ResourceKind};
use serde_json::{Value, json};

use crate::support::{ADMIN, TestApp, hive_bin};

/// Run `hive ctl <args>` with the admin token; answers (success, stdout, stderr).
pub(crate) async fn ctl(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(hive_bin());
    cmd.arg("ctl").arg("--hive").arg(&app.base).arg("--token").arg(ADMIN).args(args);
    cmd.env_remove("HIVE_ADMIN_TOKEN").stdin(std::process::Stdio::null());
    let out = cmd.output().await.expect("run hive ctl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Run a command that must succeed and print JSON.
async fn ctl_json(app: &TestApp, args: &[&str]) -> Value {
    let (ok, out, err) = ctl(app, args).await;
    assert!(ok, "hive ctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("hive ctl {args:?} printed no JSON ({e}): {out}"))
}

#[tokio::test]
async fn hive_ctl_registers_endpoints_and_reports_a_refused_migration() {
    let app = TestApp::spawn().await;
    let exports = tempfile::tempdir().unwrap();
    let dir = exports.path().to_str().unwrap();

    let (ok, out, err) = ctl(&app, &["migration", "list"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "only the header: {out}");
    assert!(out.contains("STATUS") && out.contains("EVENT"), "{out}");

    let dir_param = format!("dir={dir}");
    let add = ["migration", "source", "add", "--name", "exports", "--type", "file", "--param", &dir_param, "--param", "in_place=true"];
    let source = ctl_json(&app, &add).await;
    assert_eq!((source["name"].as_str(), source["type"].as_str()), (Some("exports"), Some("file")), "{source}");
    assert_eq!(source["params"]["in_place"], Value::Bool(true), "a value that parses as JSON is sent as JSON: {source}");
    assert_eq!(source["params"]["dir"].as_str(), Some(dir), "{source}");
    let source_id = source["id"].as_u64().expect("source id").to_string();

    let (ok, out, err) = ctl(&app, &["migration", "source", "list"]).await;
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains("exports")).unwrap_or_else(|| panic!("the source is listed: {out}"));
    assert_eq!(row.split_whitespace().take(2).collect::<Vec<_>>(), [source_id.as_str(), "file"], "{row}");

    // The hive's validation reaches the user: a file source needs its directory.
    let (ok, _, err) = ctl(&app, &["migration", "source", "add", "--name", "nodir", "--type", "file", "--params-json", "{}"]).await;
    assert!(!ok, "a file source without dir is refused");
    assert!(err.contains("dir") && err.contains("HTTP 400"), "{err}");

    let destination = ctl_json(&app, &["migration", "destination", "add", "--name", "here", "--type", "hive"]).await;
    assert_eq!(destination["type"].as_str(), Some("hive"), "{destination}");
    let destination_id = destination["id"].as_u64().expect("destination id").to_string();
    let (ok, out, err) = ctl(&app, &["migration", "destination", "list"]).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.split_whitespace().take(2).eq([destination_id.as_str(), "hive"])), "{out}");

    let create = ["migration", "create", "--name", "ghost", "--resource", "999999", "--destination", &destination_id, "--wait"];
    let (ok, out, err) = ctl(&app, &create).await;
    assert!(!ok, "a migration of a resource that does not exist is refused: {out}");
    assert!(err.contains("no resource 999999") && err.contains("HTTP 404"), "{err}");

    let (ok, out, err) = ctl(&app, &["migration", "list"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "the refused migration was not created: {out}");

    // Discovery needs a node agent; this hive has none, and says so.
    let (ok, _, err) = ctl(&app, &["migration", "source", "discover", &source_id]).await;
    assert!(!ok);
    assert!(err.contains("no node agent") && err.contains("HTTP 503"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn hive_ctl_waits_for_a_migration_and_fails_when_it_ends_in_error() {
    let app = TestApp::spawn().await;
    let exports = tempfile::tempdir().unwrap();
    let dir_param = format!("dir={}", exports.path().display());
    let source = ctl_json(&app, &["migration", "source", "add", "--name", "exports", "--type", "file", "--param", &dir_param]).await;
    let destination = ctl_json(&app, &["migration", "destination", "add", "--name", "here"]).await;
    assert_eq!(destination["type"].as_str(), Some("hive"), "the default destination type: {destination}");
    // What a discovery would have stored (no agent here to run one).
    let rows = app.hive.store().migrations().expect("the store keeps migrations");
    let found = Discovered { id_at_source: "web.vmdk".into(), kind: ResourceKind::Instance, name: "web".into(), properties: json!({}) };
    rows.replace_resources(source["id"].as_u64().unwrap(), vec![found]).await.expect("resources stored");
    let resource = rows.resources(None).await.unwrap()[0].id.to_string();

    // No node can convert, so scheduling gives up: `--wait` prints the end and exits non-zero.
    let destination_id = destination["id"].to_string();
    let create = ["migration", "create", "--name", "web", "--resource", &resource, "--destination", &destination_id, "--wait"];
    let (ok, out, err) = ctl(&app, &create).await;
    assert!(!ok, "a migration that ended in Error is a failure: {out}");
    let m: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("the final migration as JSON ({e}): {out}"));
    assert_eq!(m["status"].as_str(), Some("Error"), "{m}");
    let id = m["id"].as_u64().unwrap().to_string();
    let cause = m["error"].as_str().expect("an Error carries its cause");
    assert!(err.contains(&format!("migration {id} ended Error: {cause}")), "{err}");

    let (ok, out, err) = ctl(&app, &["migration", "list"]).await;
    assert!(ok, "{err}");
    let row: Vec<&str> = out.lines().nth(1).unwrap_or_else(|| panic!("one migration listed: {out}")).split_whitespace().collect();
    assert_eq!((row[0], row[1], row.last().copied()), (id.as_str(), "Error", Some("web")), "{out}");
    let (ok, _, err) = ctl(&app, &["migration", "show", &id, "--follow"]).await;
    assert!(!ok && err.contains("ended Error"), "following a finished migration answers at once: {err}");
    let (ok, out, err) = ctl(&app, &["migration", "delete", &id]).await;
    assert!(ok, "a finished migration can be deleted: {err}");
    assert_eq!(out.trim(), format!("deleted migration {id}"));
    let (ok, _, err) = ctl(&app, &["migration", "show", &id]).await;
    assert!(!ok && err.contains("HTTP 404"), "{err}");
    app.stop().await;
}
