//! Real guests on a real network: the `tiny-net` template of `scripts/build-test-guest.sh`
//! (DHCP by busybox udhcpc, dropbear) booted by real QEMU through a `hive node --driver libvirt`
//! on a bridge of the test's own, with a real dnsmasq (see `lab`). Checks: a pool VM holds the
//! fixed IP its hosts-file line names, got from dnsmasq by DHCP; SSH with the template's key and
//! pinned host key runs commands in it and returns exit status, stdout and stderr, and refuses
//! another host key; the node's prepare command runs in the guest and a release reverts it;
//! and the whole lifecycle (baseimage → environment with a ConfigAuto script → deployment as a
//! live snapshot → app) runs on one real VM through the hive's command channel, with the
//! instantiation times reported for the libvirt backend. Everything is removed at the end.

mod lab;

use std::time::Duration;

use guaca_hive::guest::GuestError;
use reqwest::{Method as M, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use self::lab::NetNode;
use crate::libvirt_e2e::REAL_VMS;

const BOOT: Duration = Duration::from_secs(150);
const STEP: Duration = Duration::from_secs(90);

async fn send(n: &NetNode, method: M, path: &str, body: Option<Value>, token: &str) -> (StatusCode, Value) {
    crate::support::send_json(&n.c, method, format!("{}{path}", n.hive.base), body, Some(token)).await
}

async fn get(n: &NetNode, path: &str) -> Option<Value> {
    let (s, v) = send(n, M::GET, path, None, &n.hive.token).await;
    (s == StatusCode::OK).then_some(v)
}

#[tokio::test]
async fn a_pool_vm_takes_its_fixed_address_by_dhcp_and_runs_commands_over_ssh() {
    let _turn = REAL_VMS.lock().await;
    let n = NetNode::start(1, Some("echo {home_page} > /tmp/home-page")).await;

    // The pool's VM counts as free only once `true` ran in it over SSH at its fixed IP.
    let vm = n
        .until("the pool VM is booted and answers over SSH", BOOT, || async {
            let p = get(&n, "/api/v1/pools/default").await?;
            p["vm_list"].as_array()?.iter().find(|v| v["state"] == "free")?["id"].as_u64()
        })
        .await;
    let domain = format!("default-{vm}");
    n.domains.saw(&domain);
    let (mac, ip) = n.lab.fixed(&domain).expect("the node wrote a dhcp-host line for the VM");
    assert!(ip.starts_with(&format!("{}.", n.lab.net)), "{ip} is in the node's range");
    let leases = n.lab.leases();
    assert!(leases.lines().any(|l| l.contains(&mac) && l.contains(&format!(" {ip} "))), "dnsmasq leased {ip} to {mac}:\n{leases}");

    // Straight over SSH: the guest holds that address on the MAC the node gave it.
    let ssh = n.keys.channel(&n.keys.fingerprint);
    let out = ssh
        .exec(&ip, "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0; echo to-stderr >&2; exit 7", STEP)
        .await
        .expect("a command over SSH");
    assert_eq!(out.status, 7, "{out:?}");
    assert!(out.stdout.starts_with(&format!("{mac}\n")), "{out:?}");
    assert!(out.stdout.contains(&format!("inet {ip}/24")), "the guest holds {ip}: {out:?}");
    assert_eq!(out.stderr, "to-stderr\n");
    let stranger = n.keys.channel("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU");
    match stranger.exec(&ip, "true", STEP).await {
        Err(GuestError::Auth(reason)) => assert!(reason.contains("host key"), "{reason}"),
        other => panic!("another pinned host key must be refused: {other:?}"),
    }

    // The node's prepare command runs in the guest when a user takes the VM.
    let nr = &n;
    let post =
        |path: String| async move { nr.c.post(format!("{}{path}", nr.hive.base)).send().await.expect("post").text().await.expect("body") };
    let batch: u64 = post("/prepare-batch/1/https%3A%2F%2Fexample.org%2Fnet".into()).await.parse().expect("a batch id");
    let handle: u64 = post(format!("/lock/{batch}")).await.parse().expect("a handle");
    n.until("the session is assigned", STEP, || async {
        let s = get(&n, &format!("/api/v1/pools/default/sessions/{handle}")).await?;
        (s["assigned"] == true).then_some(())
    })
    .await;
    let out = ssh.exec(&ip, "cat /tmp/home-page", STEP).await.expect("over SSH");
    assert_eq!((out.status, out.stdout.as_str()), (0, "https://example.org/net\n"), "{out:?}");

    // Release reverts the VM to its clean snapshot: the prepared file is gone, the address stays.
    post(format!("/release/{handle}")).await;
    n.until("the reverted VM is free again", STEP, || async {
        let p = get(&n, "/api/v1/pools/default").await?;
        p["vm_list"].as_array()?.iter().any(|v| v["id"] == vm && v["state"] == "free").then_some(())
    })
    .await;
    let out = ssh.exec(&ip, "test -e /tmp/home-page && echo kept || echo reverted", STEP).await.expect("over SSH");
    assert_eq!(out.stdout, "reverted\n", "{out:?}");

    // Shrinking the pool destroys the VM and frees its address.
    let r = n.c.post(format!("{}/set-pool-size/0/0/0", n.hive.base)).send().await.expect("set-pool-size");
    assert!(r.status().is_success());
    n.until("the domain is gone", STEP, || async { (!n.defined(&domain)).then_some(()) }).await;
    n.until("the address is released", STEP, || async { n.lab.fixed(&domain).is_none().then_some(()) }).await;
}

const ORDER: [&str; 5] = ["create", "config_auto", "config_interactive", "finalize", "ready"];

/// Poll `path` until it reaches `phase`; answers the object and the phases seen, which must
/// only go forward.
async fn until_phase(n: &NetNode, path: &str, phase: &str, token: &str) -> (Value, Vec<String>) {
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + BOOT;
    let v = loop {
        let (s, v) = send(n, M::GET, path, None, token).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        let now = v["phase"].as_str().expect("phase").to_string();
        assert!(now != "failed", "{path} failed: {v}\n{}", n.diagnostics());
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now == phase {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path} not in phase {phase} in time; seen {seen:?}\n{}", n.diagnostics());
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, bounded by the deadline
    };
    let ranks: Vec<usize> = seen.iter().map(|p| ORDER.iter().position(|o| o == p).expect("a live phase")).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{path}: phases went backwards: {seen:?}");
    (v, seen)
}

async fn accepted(n: &NetNode, path: &str, body: Value, token: &str) -> Value {
    let (s, v) = send(n, M::POST, path, Some(body), token).await;
    assert_eq!(s, StatusCode::ACCEPTED, "POST {path}: {v}");
    v
}

/// The output of `runs[i]` of a lifecycle object: (command, status, stdout, stderr).
fn run(v: &Value, i: usize) -> (&str, i64, &str, &str) {
    let r = &v["runs"][i];
    (
        r["command"].as_str().unwrap_or(""),
        r["status"].as_i64().unwrap_or(-100),
        r["stdout"].as_str().unwrap_or(""),
        r["stderr"].as_str().unwrap_or(""),
    )
}

#[tokio::test]
async fn the_lifecycle_runs_on_a_real_vm_through_the_ssh_channel() {
    let _turn = REAL_VMS.lock().await;
    let n = NetNode::start(0, None).await;
    let admin = n.hive.token.clone();
    let (s, u) = send(&n, M::POST, "/api/v1/users", Some(json!({"name": "alice"})), &admin).await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    let alice = u["token"].as_str().expect("a user token").to_string();

    let b = accepted(&n, "/api/v1/baseimages", json!({"name": "tiny-net", "template": "tiny-net"}), &admin).await;
    let base_path = format!("/api/v1/baseimages/{}", b["id"]);
    until_phase(&n, &base_path, "ready", &admin).await;

    // CloneTemplate: a linked clone, booted; its scripts run over SSH; then the owner is done.
    let scripts = ["ip -4 -o addr show eth0", "echo configured > /tmp/env-mark && echo marked >&2"];
    let e = accepted(&n, &format!("{base_path}/environments"), json!({"name": "work", "scripts": scripts}), &alice).await;
    let env_path = format!("/api/v1/environments/{}", e["id"]);
    let (e, mut seen) = until_phase(&n, &env_path, "config_interactive", &alice).await;
    let domain = e["domain"].as_str().expect("the environment's domain").to_string();
    n.domains.saw(&domain);
    let (_, ip) = n.lab.fixed(&domain).expect("a dhcp-host line for the environment's VM");
    let (cmd, status, stdout, _) = run(&e, 0);
    assert_eq!((cmd, status), (scripts[0], 0), "{e}");
    assert!(stdout.contains(&format!("inet {ip}/24")), "the guest holds its fixed address {ip}: {e}");
    assert_eq!(run(&e, 1), (scripts[1], 0, "", "marked\n"), "{e}");
    assert!(e["console"]["port"].as_u64().is_some(), "the console is shown while configuring: {e}");
    accepted(&n, &format!("{env_path}/done"), json!({}), &alice).await;
    let (e, more) = until_phase(&n, &env_path, "ready", &alice).await;
    seen.extend(more);
    seen.dedup();
    assert_eq!(seen, ORDER, "every sub-phase, in order");
    assert_eq!(e["snapshot"], "environment");

    // CreateSnapshot: back to the environment's snapshot (the mark is there), a script, a live snapshot.
    let d = accepted(
        &n,
        &format!("{env_path}/deployments"),
        json!({"name": "app", "interactive": false, "scripts": ["cat /tmp/env-mark && echo deployed > /tmp/dep-mark"]}),
        &alice,
    )
    .await;
    let dep_path = format!("/api/v1/deployments/{}", d["id"]);
    let (d, _) = until_phase(&n, &dep_path, "ready", &alice).await;
    assert_eq!(d["domain"].as_str(), Some(domain.as_str()), "a deployment lives on its environment's VM");
    assert_eq!(run(&d, 0).2, "configured\n", "the environment's snapshot kept what ConfigAuto wrote: {d}");
    assert_eq!(d["snapshot"].as_str(), Some(format!("deployment-{}", d["id"]).as_str()));

    // RunApp: revert to the live snapshot and run the command; its output and console are there.
    let a =
        accepted(&n, &format!("{dep_path}/apps"), json!({"command": "cat /tmp/env-mark /tmp/dep-mark; echo app-running"}), &alice).await;
    let app_path = format!("/api/v1/apps/{}", a["id"]);
    let (a, seen) = until_phase(&n, &app_path, "ready", &alice).await;
    assert!(seen.iter().all(|p| p == "create" || p == "ready"), "an app has no sub-phases: {seen:?}");
    assert_eq!(run(&a, 0).1, 0, "{a}");
    assert_eq!(run(&a, 0).2, "configured\ndeployed\napp-running\n", "{a}");
    let console = &a["console"];
    let port = console["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or_else(|| panic!("a ready app shows its console: {a}"));
    let mut rfb =
        tokio::net::TcpStream::connect((console["host"].as_str().unwrap_or("127.0.0.1"), port)).await.expect("the app's VNC port");
    let mut greeting = [0u8; 12];
    rfb.read_exact(&mut greeting).await.expect("an RFB greeting");
    assert_eq!(&greeting, b"RFB 003.008\n");
    drop(rfb);

    let metrics = n.c.get(format!("{}/metrics", n.hive.base)).send().await.expect("/metrics").text().await.expect("body");
    for step in ["clone", "boot", "snapshot", "revert", "app"] {
        let line = format!("hive_instantiation_seconds_count{{backend=\"libvirt\",step=\"{step}\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&line)), "no {line} in /metrics");
    }

    // Delete from the leaves up: the VM and its address go with the environment.
    for (path, token) in [(&app_path, &alice), (&dep_path, &alice), (&env_path, &alice), (&base_path, &admin)] {
        let (s, v) = send(&n, M::DELETE, path, None, token).await;
        assert_eq!(s, StatusCode::ACCEPTED, "DELETE {path}: {v}");
        n.until(&format!("{path} is gone"), STEP, || async {
            (send(&n, M::GET, path, None, token).await.0 == StatusCode::NOT_FOUND).then_some(())
        })
        .await;
    }
    assert!(!n.defined(&domain), "the environment's domain was destroyed");
    assert!(n.lab.fixed(&domain).is_none(), "its address was released");
}
