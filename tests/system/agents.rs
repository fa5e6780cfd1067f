//! Nodes over the network, with real processes: one `hive` and several `hive node` agents on
//! loopback (each agent drives the simulated hypervisor; the hive, the agents, the WebSocket
//! and the store are real). A node killed with SIGKILL turns dead within three heartbeat
//! intervals, its VMs are replaced on other nodes and its user's handle reports the loss; a
//! hive killed and restarted under live agents duplicates no node and no VM and keeps handles.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{hive_bin, spawn_hive, until};

/// Heartbeat of these tests; suspect after 1.5 beats, dead after 2.5.
const BEAT_MS: u64 = 400;

pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) struct Hive {
    pub(crate) proc: Proc,
    pub(crate) base: String,
    pub(crate) token: String,
}

pub(crate) fn start_hive(dir: &Path, listen: &str, env: &[(&str, String)]) -> Hive {
    let (child, base) = spawn_hive(
        Command::new(hive_bin())
            .args(["up", "--listen", listen, "--sim-nodes", "0", "--data-dir"])
            .arg(dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("HIVE_NODE__HEARTBEAT_MS", BEAT_MS.to_string())
            .env("HIVE_NODE__SUSPECT_AFTER_MS", (BEAT_MS * 3 / 2).to_string())
            .env("HIVE_NODE__DEAD_AFTER_MS", (BEAT_MS * 5 / 2).to_string())
            .env("HIVE_NODE__PLACEMENT_TOP_K", "1")
            .env("HIVE_POOL__PING_INTERVAL_MS", "200")
            .env("HIVE_POOL__BOOT_BACKOFF_MAX_MS", "1000")
            .env("RUST_LOG", "warn"),
    );
    let token = std::fs::read_to_string(dir.join("admin-token")).expect("admin token").trim().to_string();
    Hive { proc: Proc { child }, base, token }
}

pub(crate) fn start_agent(hive: &str, token: &str, dir: &Path, name: &str) -> Proc {
    let child = Command::new(hive_bin())
        .args(["node", "--hive", hive, "--cores", "4", "--ram-mb", "8192", "--disk-mb", "100000", "--name", name, "--data-dir"])
        .arg(dir)
        .env("HIVE_NODE_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agent");
    Proc { child }
}

/// A fresh join token from the hive's admin.
pub(crate) async fn join_token(c: &reqwest::Client, hive: &Hive) -> String {
    let r = c.post(format!("{}/api/v1/nodes/join-tokens", hive.base)).bearer_auth(&hive.token).send().await.unwrap();
    r.json::<Value>().await.unwrap()["token"].as_str().expect("a join token").to_string()
}

struct Cluster {
    hive: Hive,
    agents: Vec<(String, PathBuf, Proc)>,
    c: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(nodes: usize) -> Cluster {
        Cluster::start_with(nodes, &[]).await
    }

    /// With extra `HIVE_…` settings for the hive.
    async fn start_with(nodes: usize, env: &[(&str, String)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", env);
        let c = reqwest::Client::new();
        let mut agents = Vec::new();
        for i in 1..=nodes {
            let jt = join_token(&c, &hive).await;
            let name = format!("agent-{i}");
            let adir = dir.path().join(&name);
            agents.push((name.clone(), adir.clone(), start_agent(&hive.base, &jt, &adir, &name)));
        }
        let cl = Cluster { hive, agents, c, _dir: dir };
        cl.until_nodes("all nodes ready", |n| n.len() == nodes && n.iter().all(|n| n["state"] == "ready")).await;
        cl
    }

    /// GET as JSON; `Null` if the hive cannot be reached (it may be restarting: callers poll).
    async fn get(&self, path: &str) -> Value {
        match self.c.get(format!("{}{path}", self.hive.base)).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    async fn post(&self, path: &str) -> String {
        let r = self.c.post(format!("{}{path}", self.hive.base)).send().await.expect("request");
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.text().await.unwrap()
    }

    async fn nodes(&self) -> Vec<Value> {
        self.get("/api/v1/nodes").await.as_array().cloned().unwrap_or_default()
    }

    async fn until_nodes(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        until(what, Duration::from_secs(60), || async {
            let n = self.nodes().await;
            pred(&n).then_some(n)
        })
        .await
    }

    /// The default pool's VMs as (id, state, node).
    async fn vms(&self) -> Vec<(u64, String, Option<u64>)> {
        let p = self.get("/api/v1/pools/default").await;
        p["vm_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["id"].as_u64().unwrap(), v["state"].as_str().unwrap().to_string(), v["node"].as_u64()))
            .collect()
    }

    async fn assigned(&self, h: u64) -> Value {
        until("handle assigned", Duration::from_secs(30), || async {
            let s = self.get(&format!("/handle-status/{h}")).await;
            (s["assigned"] == true).then_some(s)
        })
        .await
    }

    async fn node_of_vm(&self, vm: u64) -> u64 {
        self.vms().await.into_iter().find(|v| v.0 == vm).and_then(|v| v.2).expect("the VM is placed")
    }
}

/// Domains an agent's simulated hypervisor holds, read from its state file.
fn agent_domains(dir: &Path) -> usize {
    let text = std::fs::read_to_string(dir.join("sim-state.json")).unwrap_or_else(|_| "{}".into());
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    v.as_object().map(|m| m.len()).unwrap_or(0)
}

#[tokio::test]
async fn a_killed_node_turns_dead_and_its_vms_are_replaced_elsewhere() {
    let mut cl = Cluster::start(3).await;
    cl.post("/set-pool-size/3/6/600000").await;
    let b: u64 = cl.post("/prepare-batch/1/https%3A%2F%2Fexample.org").await.parse().unwrap();
    let h: u64 = cl.post(&format!("/lock/{b}")).await.parse().unwrap();
    let vm = cl.assigned(h).await["vmid"].as_u64().unwrap();
    let victim = cl.node_of_vm(vm).await;
    let nodes = cl.nodes().await;
    let name = nodes.iter().find(|n| n["id"] == victim).unwrap()["name"].as_str().unwrap().to_string();
    let i = cl.agents.iter().position(|(n, _, _)| *n == name).expect("the agent of that node");
    let (_, _, mut proc) = cl.agents.remove(i);
    proc.child.kill().expect("kill -9 the agent");
    proc.child.wait().unwrap();

    let nodes = cl.until_nodes("the killed node is dead", |n| n.iter().any(|n| n["id"] == victim && n["state"] == "dead")).await;
    let dead = nodes.iter().find(|n| n["id"] == victim).unwrap();
    // By the hive's own clock: from the last heartbeat it got to the declaration of death.
    let silent = dead["state_since"].as_u64().unwrap() - dead["last_heartbeat_at"].as_u64().unwrap();
    assert!(silent <= 3 * BEAT_MS, "dead {silent} ms after the last heartbeat (limit {} ms)", 3 * BEAT_MS);

    // The handle reports the loss.
    until("the handle reports the loss", Duration::from_secs(30), || async {
        let ev = cl.get(&format!("/fetch-events/{h}/-1")).await;
        let events = ev["newEvents"].as_array().cloned().unwrap_or_default();
        events.iter().any(|e| e["data"]["type"] == "vm-lost").then_some(())
    })
    .await;

    // The pool is whole again, on the living nodes only.
    until("VMs replaced on other nodes", Duration::from_secs(30), || async {
        let vms = cl.vms().await;
        let ok = vms.len() >= 3 && vms.iter().all(|v| v.2 != Some(victim) && matches!(v.1.as_str(), "free" | "ready" | "occupied"));
        ok.then_some(())
    })
    .await;
    // A new user gets a VM on a living node.
    let h2: u64 = cl.post(&format!("/lock/{b}")).await.parse().unwrap();
    let vm2 = cl.assigned(h2).await["vmid"].as_u64().unwrap();
    assert_ne!(cl.node_of_vm(vm2).await, victim);
}

#[tokio::test]
async fn restarting_the_hive_under_live_agents_duplicates_nothing() {
    let mut cl = Cluster::start(2).await;
    cl.post("/set-pool-size/2/4/600000").await;
    let b: u64 = cl.post("/prepare-batch/1/https%3A%2F%2Fexample.org").await.parse().unwrap();
    let h: u64 = cl.post(&format!("/lock/{b}")).await.parse().unwrap();
    let before = cl.assigned(h).await;
    let settled = until("pool settled", Duration::from_secs(30), || async {
        let vms = cl.vms().await;
        (vms.len() >= 2 && vms.iter().all(|v| matches!(v.1.as_str(), "free" | "ready" | "occupied"))).then_some(vms)
    })
    .await;
    let node_ids: Vec<Value> = cl.nodes().await.iter().map(|n| n["id"].clone()).collect();

    // Kill the hive (no shutdown path runs) and start it again on the same address.
    let listen = cl.hive.base.trim_start_matches("http://").to_string();
    cl.hive.proc.child.kill().unwrap();
    cl.hive.proc.child.wait().unwrap();
    let dir = cl._dir.path().join("hive");
    cl.hive = start_hive(&dir, &listen, &[]);

    let nodes = cl.until_nodes("agents re-registered", |n| n.len() == 2 && n.iter().all(|n| n["state"] == "ready")).await;
    assert_eq!(nodes.iter().map(|n| n["id"].clone()).collect::<Vec<_>>(), node_ids, "the same nodes, none added");
    let after = cl.get(&format!("/handle-status/{h}")).await;
    assert_eq!(after["vmid"], before["vmid"], "the handle keeps its VM");
    let vms = cl.vms().await;
    let ids = |v: &[(u64, String, Option<u64>)]| v.iter().map(|x| (x.0, x.2)).collect::<Vec<_>>();
    assert_eq!(ids(&vms), ids(&settled), "the same VMs on the same nodes");
    // Every VM of the pool exists once on its agent, and no agent holds a domain the pool lacks.
    let domains: usize = cl.agents.iter().map(|(_, d, _)| agent_domains(d)).sum();
    assert_eq!(domains, vms.len(), "domains on the agents vs VMs in the pool");
}

#[tokio::test]
async fn bad_tokens_and_credentials_are_refused() {
    let cl = Cluster::start(0).await;
    let url = |p: &str| format!("{}{p}", cl.hive.base);
    // Join tokens are an admin's to give.
    let r = cl.c.post(url("/api/v1/nodes/join-tokens")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = cl.c.post(url("/api/v1/nodes/register")).bearer_auth("hjt_nope").json(&serde_json::json!({"name": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "bad_join_token");
    // A token joins once.
    let jt = join_token(&cl.c, &cl.hive).await;
    let first = cl.c.post(url("/api/v1/nodes/register")).bearer_auth(&jt).json(&serde_json::json!({"name": "x"})).send().await.unwrap();
    assert_eq!(first.status(), 201);
    let credential = first.json::<Value>().await.unwrap()["credential"].as_str().unwrap().to_string();
    // A node's credential opens the origin's manifests and pieces (here: auth passes, no image).
    let manifest = url(&format!("/api/v1/images/{}/manifest", "a".repeat(64)));
    assert_eq!(cl.c.get(&manifest).bearer_auth(&credential).send().await.unwrap().status(), 404);
    assert_eq!(cl.c.get(&manifest).bearer_auth(format!("hnc_{}", "y".repeat(40))).send().await.unwrap().status(), 401);
    let again = cl.c.post(url("/api/v1/nodes/register")).bearer_auth(&jt).json(&serde_json::json!({"name": "y"})).send().await.unwrap();
    assert_eq!(again.status(), 401);
    // An agent with a made-up credential is refused and stops, saying why.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(hive_bin())
        .args(["node", "--hive", &cl.hive.base, "--cores", "1", "--ram-mb", "1024", "--disk-mb", "1000", "--data-dir"])
        .arg(dir.path())
        .env("HIVE_NODE_TOKEN", format!("hnc_{}", "x".repeat(40)))
        .env("RUST_LOG", "error")
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not accept"), "{err}");
    assert_eq!(cl.nodes().await.len(), 1, "only the node that joined with the token");
    // A removed node's id is never handed out again (its ledger and ratings stay its own).
    let r = cl.c.delete(url("/api/v1/nodes/10001")).bearer_auth(&cl.hive.token).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let jt = join_token(&cl.c, &cl.hive).await;
    let next =
        cl.c.post(url("/api/v1/nodes/register"))
            .bearer_auth(&jt)
            .json(&serde_json::json!({"name": "z"}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
    assert_eq!(next["node_id"], 10_002, "{next}");
}

/// Upload `data` as an image through the API, in chunks; answers its SHA-256.
async fn upload(cl: &Cluster, data: &[u8]) -> String {
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(data));
    let url = |p: &str| format!("{}{p}", cl.hive.base);
    let body = serde_json::json!({"name": "desktop", "sha256": sha, "size": data.len(), "cores": 1, "ram_mb": 1024, "disk_mb": 4096});
    let r: Value =
        cl.c.post(url("/api/v1/images/uploads")).bearer_auth(&cl.hive.token).json(&body).send().await.unwrap().json().await.unwrap();
    let id = r["upload_id"].as_str().expect("upload id").to_string();
    let chunk = r["chunk_max"].as_u64().unwrap() as usize;
    for (i, part) in data.chunks(chunk).enumerate() {
        let r =
            cl.c.patch(url(&format!("/api/v1/images/uploads/{id}?offset={}", i * chunk)))
                .bearer_auth(&cl.hive.token)
                .body(part.to_vec())
                .send()
                .await
                .unwrap();
        assert!(r.status().is_success(), "chunk {i}: {}", r.status());
    }
    let r = cl.c.post(url(&format!("/api/v1/images/uploads/{id}/complete"))).bearer_auth(&cl.hive.token).send().await.unwrap();
    assert_eq!(r.status(), 201, "complete");
    sha
}

async fn distribute(cl: &Cluster, sha: &str, body: Value) -> Vec<u64> {
    let r =
        cl.c.post(format!("{}/api/v1/images/{sha}/distribute", cl.hive.base)).bearer_auth(&cl.hive.token).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["nodes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
}

async fn until_replicas_ready(cl: &Cluster, sha: &str, n: usize) -> Vec<Value> {
    until("replicas ready", Duration::from_secs(240), || async {
        let r = cl.get(&format!("/api/v1/images/{sha}/replicas")).await;
        let list = r.as_array().cloned().unwrap_or_default();
        assert!(!list.iter().any(|x| x["state"] == "failed"), "a fetch failed: {r}");
        (list.iter().filter(|x| x["state"] == "ready").count() == n).then_some(list)
    })
    .await
}

#[tokio::test]
async fn a_200_mb_image_reaches_four_nodes_verified_and_peers_share_it() {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest;
    let mut data = vec![0u8; 200 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    let sha = hex::encode(sha2::Sha256::digest(&data));
    // The pool's VMs are made from this image; no VM until the image is on the nodes.
    let env = [
        ("HIVE_VM__TEMPLATE", sha.clone()),
        ("HIVE_POOL__DEFAULT_SIZE__MIN", "0".to_string()),
        ("HIVE_POOL__DEFAULT_SIZE__MAX", "0".to_string()),
    ];
    let cl = Cluster::start_with(4, &env).await;
    assert_eq!(upload(&cl, &data).await, sha);
    drop(data);
    // Bad requests change nothing.
    let r = cl.c.post(format!("{}/api/v1/images/{sha}/distribute", cl.hive.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r =
        cl.c.post(format!("{}/api/v1/images/{sha}/distribute", cl.hive.base))
            .bearer_auth(&cl.hive.token)
            .json(&serde_json::json!({"replicas": 9}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 400, "more replicas than nodes");
    assert!(cl.get(&format!("/api/v1/images/{sha}/replicas")).await.as_array().unwrap().is_empty());

    // One node first, from the origin only.
    let first = distribute(&cl, &sha, serde_json::json!({"replicas": 1, "distributor": "SORT_UF"})).await;
    assert_eq!(first.len(), 1);
    let ready = until_replicas_ready(&cl, &sha, 1).await;
    assert_eq!(ready[0]["report"]["verified"], true);
    assert_eq!(ready[0]["report"]["remote_hits"], 0, "nobody else had it");
    // Then the other three, with TWO_CHOICES: they fetch from the first node and each other.
    let rest = distribute(&cl, &sha, serde_json::json!({"replicas": 3})).await;
    assert_eq!(rest.len(), 3);
    assert!(!rest.contains(&first[0]));
    let all = until_replicas_ready(&cl, &sha, 4).await;
    let pieces = all[0]["report"]["pieces"].as_u64().unwrap();
    assert_eq!(pieces, 50, "200 MiB in 4 MiB pieces");
    let mut remote = 0;
    for r in all.iter().filter(|r| rest.contains(&r["node"].as_u64().unwrap())) {
        let rep = &r["report"];
        assert_eq!(rep["verified"], true, "{r}");
        assert_eq!(rep["sha256"], sha.as_str());
        assert_eq!(rep["remote_hits"].as_u64().unwrap() + rep["misses"].as_u64().unwrap(), pieces, "every piece read once: {rep}");
        remote += rep["remote_hits"].as_u64().unwrap();
    }
    assert!(remote > 0, "peers served pieces: {all:?}");
    // The node caches' counters reach the hive with the heartbeats.
    cl.until_nodes("cache counters reported", |nodes| {
        let served: u64 = nodes.iter().map(|n| n["cache"]["served"].as_u64().unwrap_or(0)).sum();
        let hits: u64 = nodes.iter().map(|n| n["cache"]["remote_hit"].as_u64().unwrap_or(0)).sum();
        served > 0 && hits == remote
    })
    .await;
    // The hive's metrics count the nodes' cache reads too.
    let metrics = cl.c.get(format!("{}/metrics", cl.hive.base)).send().await.unwrap().text().await.unwrap();
    let remote_hits: f64 = metrics
        .lines()
        .find(|l| l.starts_with("hive_node_cache_reads_total{outcome=\"remote_hit\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no remote_hit series in /metrics"));
    assert_eq!(remote_hits as u64, remote, "metrics agree with the fetch reports");
    // And the file on every node is the image.
    for (_, dir, _) in &cl.agents {
        let bytes = std::fs::read(dir.join("images").join(&sha)).expect("the image file on the node");
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), sha);
    }
    // Every node keeps a ready stock of two prepared copies.
    let stock = |n: &Value| n["stock"][sha.as_str()].as_u64().unwrap_or(0);
    cl.until_nodes("two ready copies on every node", |nodes| nodes.len() == 4 && nodes.iter().all(|n| stock(n) == 2)).await;
    // A VM made from the image takes its disk from the stock, and the stock is topped up again.
    cl.post("/set-pool-size/1/1/600000").await;
    let vm = until("a VM from the image", Duration::from_secs(60), || async {
        cl.vms().await.into_iter().find(|v| v.1 == "free" && v.2.is_some())
    })
    .await;
    let node = vm.2.unwrap();
    let name = cl.nodes().await.into_iter().find(|n| n["id"] == node).unwrap()["name"].as_str().unwrap().to_string();
    let dir = &cl.agents.iter().find(|(n, _, _)| *n == name).unwrap().1;
    let disks: Vec<_> = std::fs::read_dir(dir.join("disks")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(disks.len(), 1, "one VM, one disk: {disks:?}");
    assert_eq!(hex::encode(sha2::Sha256::digest(std::fs::read(&disks[0]).unwrap())), sha, "the disk is a copy of the image");
    cl.until_nodes("the used copy replaced", |nodes| nodes.iter().find(|n| n["id"] == node).is_some_and(|n| stock(n) == 2)).await;
}
