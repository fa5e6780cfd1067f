//! One hive, two instances: two `hive serve` processes on one Postgres (a cluster the test
//! owns), one `hive node --hive A,B` agent. The node joins through A and is connected to, and
//! ready on, both; B adopts it from the store although it joined after B started. Ids issued
//! by one instance are not issued again by the other. B killed and started again on the same
//! database and address gets the agent back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::{Hive, Proc, join_token};
use crate::servers::{OwnPostgres, OwnRedis};
use crate::support::{hive_bin, spawn_hive, until};

const ADMIN_TOKEN: &str = "multi-test-admin-token";
const BEAT_MS: u64 = 400;

fn serve(dir: &Path, listen: &str, database_url: &str, redis_url: &str) -> Hive {
    let (child, base) = spawn_hive(
        Command::new(hive_bin())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir)
            .env("HIVE_DATABASE_URL", database_url)
            .env("HIVE_COORD__REDIS_URL", redis_url)
            .env("HIVE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HIVE_NODE__HEARTBEAT_MS", BEAT_MS.to_string())
            .env("HIVE_NODE__SUSPECT_AFTER_MS", (BEAT_MS * 3 / 2).to_string())
            .env("HIVE_NODE__DEAD_AFTER_MS", (BEAT_MS * 5 / 2).to_string())
            // Only nodes are under test: keep the pools empty.
            .env("HIVE_POOL__DEFAULT_SIZE__MIN", "0")
            .env("HIVE_POOL__DEFAULT_SIZE__MAX", "0")
            .env("RUST_LOG", "warn"),
    );
    Hive { proc: Proc { child }, base, token: ADMIN_TOKEN.into() }
}

/// The node `id` as `hive` lists it, if it does (`None` too while the hive cannot be reached).
async fn node(c: &reqwest::Client, hive: &Hive, id: u64) -> Option<Value> {
    let r = c.get(format!("{}/api/v1/nodes", hive.base)).send().await.ok()?;
    r.json::<Value>().await.ok()?.as_array()?.iter().find(|n| n["id"] == id).cloned()
}

async fn until_ready(c: &reqwest::Client, hive: &Hive, id: u64, what: &str) -> Value {
    until(what, Duration::from_secs(60), || async { node(c, hive, id).await.filter(|n| n["state"] == "ready" && n["connected"] == true) })
        .await
}

/// Join without an agent: answers (node id, credential).
async fn register(c: &reqwest::Client, hive: &Hive, name: &str) -> (u64, String) {
    let jt = join_token(c, hive).await;
    let r = c.post(format!("{}/api/v1/nodes/register", hive.base)).bearer_auth(&jt).json(&json!({ "name": name })).send().await.unwrap();
    assert_eq!(r.status(), 201, "join through {}", hive.base);
    let v: Value = r.json().await.unwrap();
    (v["node_id"].as_u64().expect("a node id"), v["credential"].as_str().expect("a credential").to_string())
}

#[tokio::test]
async fn an_agent_serves_two_instances_of_one_hive_and_survives_one_restarting() {
    let pg = OwnPostgres::start();
    pg.create_db("hive");
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let redis = OwnRedis::start();
    let a = serve(&dir.path().join("a"), "127.0.0.1:0", &pg.url("hive"), &redis.url());
    let mut b = serve(&dir.path().join("b"), "127.0.0.1:0", &pg.url("hive"), &redis.url());

    // Joins through either instance draw from one sequence of ids.
    let (first, cred) = register(&c, &a, "through-a").await;
    let (second, _) = register(&c, &b, "through-b").await;
    assert!(second > first, "B issued {second} after A issued {first}");
    // B knows the node that joined through A by its credential (taken from the store), and
    // still refuses one nobody issued. The image route checks node credentials the same way.
    let manifest = format!("{}/api/v1/images/{}/manifest", b.base, "a".repeat(64));
    assert_eq!(c.get(&manifest).bearer_auth(&cred).send().await.unwrap().status(), 404, "authenticated; no such image");
    assert_eq!(c.get(&manifest).bearer_auth(format!("hnc_{}", "x".repeat(40))).send().await.unwrap().status(), 401);

    let jt = join_token(&c, &a).await;
    let _agent = Proc {
        child: Command::new(hive_bin())
            .args(["node", "--hive", &format!("{},{}", a.base, b.base), "--driver", "sim", "--cores", "4", "--ram-mb", "8192"])
            .args(["--disk-mb", "100000", "--name", "multi", "--data-dir"])
            .arg(dir.path().join("agent"))
            .env("HIVE_NODE_TOKEN", &jt)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start agent"),
    };
    // The agent joined through A: its id is the one after the two above.
    let id = until("the agent's node is listed by A", Duration::from_secs(60), || async {
        let r = c.get(format!("{}/api/v1/nodes", a.base)).send().await.ok()?;
        let nodes = r.json::<Value>().await.ok()?;
        nodes.as_array()?.iter().find(|n| n["name"] == "multi").and_then(|n| n["id"].as_u64())
    })
    .await;
    assert_eq!(id, second + 1);
    let on_a = until_ready(&c, &a, id, "the node is ready on A").await;
    let on_b = until_ready(&c, &b, id, "the node is ready on B").await;
    for n in [&on_a, &on_b] {
        assert_eq!((n["name"].as_str(), n["cores"].as_u64(), n["remote"].as_bool()), (Some("multi"), Some(4), Some(true)), "{n}");
    }
    // Ready comes with the hello; heartbeats follow on each connection of their own.
    until("B gets heartbeats", Duration::from_secs(30), || async { node(&c, &b, id).await.filter(|n| n["last_heartbeat_at"].is_u64()) })
        .await;

    // B dies (SIGKILL) and comes back on the same database and address: the agent, still
    // connected to A all along, reconnects to it.
    let listen = b.base.trim_start_matches("http://").to_string();
    b.proc.child.kill().expect("kill -9 hive B");
    b.proc.child.wait().expect("reap hive B");
    b = serve(&dir.path().join("b"), &listen, &pg.url("hive"), &redis.url());
    until_ready(&c, &b, id, "the node is ready on B again").await;
    let on_a = node(&c, &a, id).await.expect("A still lists the node");
    assert_eq!(on_a["state"], "ready", "A kept the node while B was away: {on_a}");

    // An admin cordons the node through A; B, which may run pools that use it, follows.
    let r = c.post(format!("{}/api/v1/nodes/{id}/cordon", a.base)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "cordon through A");
    until("B sees the node cordoned", Duration::from_secs(15), || async { node(&c, &b, id).await.filter(|n| n["admin"] == "cordoned") })
        .await;
    let r = c.post(format!("{}/api/v1/nodes/{id}/activate", b.base)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "activate through B");
    until("A sees the node active again", Duration::from_secs(15), || async { node(&c, &a, id).await.filter(|n| n["admin"] == "active") })
        .await;
}
