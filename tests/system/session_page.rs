//! The session page in a real browser. End to end: a real `hive up` and a `hive node --driver
//! desktop` agent (Xvfb, x11vnc and a kiosk Chromium per VM) serve a desktop whose home page,
//! served by the test, is one solid colour; a headless Chromium opens `/sessions/default.{id}`
//! and noVNC, through the gateway, must paint that colour over most of its canvas (screenshot
//! kept in `target/test-artifacts/`); the page extends, rates and releases the session. Without
//! noVNC installed the page still works and says what is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warp::Filter;

use crate::agents::{Proc, join_token, start_hive};
use crate::browser::{Browser, artifacts};
use crate::support::{TestApp, hive_bin, send_json, until};

/// The home page's colour (#00a050), which must fill the desktop seen through noVNC.
const GREEN: [u8; 3] = [0x00, 0xa0, 0x50];

/// A page in one colour; answers how many times it was fetched.
async fn serve_home_page() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let route = warp::path::end().map(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        warp::reply::html("<!doctype html><html><body style=\"margin:0;height:100vh;background:#00a050\"></body></html>")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    (url, hits, tokio::spawn(warp::serve(route).incoming(listener).run()))
}

fn start_desktop_agent(hive: &str, token: &str, dir: &Path) -> Proc {
    let child = Command::new(hive_bin())
        .args(["node", "--hive", hive, "--driver", "desktop", "--name", "desk-1"])
        .args(["--cores", "4", "--ram-mb", "8192", "--disk-mb", "100000", "--data-dir"])
        .arg(dir)
        .env("HIVE_NODE_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the desktop agent");
    Proc { child }
}

/// Ends what the agent's desktops left running once the agent is gone (it is killed, so it
/// cannot stop them): the process groups its pid files name, and anything naming its directory
/// (Chromium's crash handler leaves the browser's group).
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let start_time = |pid: i32| -> Option<String> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(')')?.1.split_whitespace().nth(19).map(str::to_string)
        };
        let pid_files = std::fs::read_dir(self.0.join("desktops")).into_iter().flatten().flatten().map(|d| d.path().join("pids"));
        for line in pid_files.filter_map(|f| std::fs::read_to_string(f).ok()).collect::<Vec<_>>().iter().flat_map(|t| t.lines()) {
            let mut f = line.split_whitespace();
            if let (Some(Ok(pid)), Some(started)) = (f.next().map(str::parse::<i32>), f.next()) {
                if pid > 1 && start_time(pid).as_deref() == Some(started) {
                    // SAFETY: kill(2) on a process group this test's agent started.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            }
        }
        let mine = self.0.to_string_lossy().into_owned();
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|d| d.file_name().to_str()?.parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&mine) {
                // SAFETY: as above; the process names this test's own directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Share of the noVNC canvas's pixels near `GREEN` (put in for `GREEN_RGB`), with the canvas's
/// size; null while there is no canvas or it is empty.
const GREEN_SHARE: &str = r#"
    const c = document.querySelector('#screen canvas');
    if (!c || !c.width || !c.height) return null;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let near = 0;
    for (let i = 0; i < d.length; i += 4) {
        if (Math.abs(d[i] - GREEN_RGB[0]) <= 12 && Math.abs(d[i + 1] - GREEN_RGB[1]) <= 12
            && Math.abs(d[i + 2] - GREEN_RGB[2]) <= 12) near++;
    }
    return {share: near / (c.width * c.height), width: c.width, height: c.height};
"#;

#[tokio::test]
async fn the_session_page_shows_the_desktop_through_novnc_and_releases_it() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &[]);
    let c = reqwest::Client::new();
    let base = hive.base.clone();
    let api = |m: reqwest::Method, path: &str, body: Option<Value>| send_json(&c, m, format!("{base}{path}"), body, None);

    // One desktop: the pool is sized before the node joins, so nothing else is built on it.
    let (home, hits, _server) = serve_home_page().await;
    let (s, b) = api(reqwest::Method::POST, "/set-pool-size/1/1/600000", None).await;
    assert_eq!(s, 200, "{b}");
    let jt = join_token(&c, &hive).await;
    let agent_dir = dir.path().join("agent");
    let _leftovers = Leftovers(agent_dir.clone());
    let _agent = start_desktop_agent(&hive.base, &jt, &agent_dir);
    let encoded: String = url_encode(&home);
    let (s, b) = api(reqwest::Method::POST, &format!("/prepare-batch/1/{encoded}"), None).await;
    assert_eq!(s, 200, "{b}");
    let batch: u64 = b.as_u64().or_else(|| b.as_str().and_then(|s| s.parse().ok())).expect("batch id");

    let (s, session) = api(reqwest::Method::POST, "/api/v1/pools/default/sessions", Some(json!({"batch": batch, "wait_ms": 60_000}))).await;
    assert_eq!(s, 201, "{session}");
    let id = session["id"].as_u64().unwrap();
    assert!(session["vm"]["id"].is_u64(), "the session holds a VM: {session}");
    // The desktop's browser has fetched the home page (it then paints it; the canvas check
    // below waits for that).
    until("the desktop's browser loads the home page", Duration::from_secs(60), || async {
        (hits.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    let locked = started.elapsed();
    // An expiry 10 minutes away, for the countdown and the extension.
    let (s, extended) =
        api(reqwest::Method::POST, &format!("/api/v1/pools/default/sessions/{id}/extend"), Some(json!({"ms": 600_000}))).await;
    assert_eq!(s, 200, "{extended}");
    let expires_at = extended["expires_at"].as_u64().expect("an expiry");

    let browser = Browser::start().await;
    let page = format!("{base}/sessions/default.{id}");
    browser.open(&page).await;
    let t = Instant::now();
    let script = GREEN_SHARE.replace("GREEN_RGB", &format!("{GREEN:?}"));
    let seen = browser
        .wait_for(
            "noVNC paints the desktop's home page over most of its canvas",
            &format!("const r = (() => {{ {script} }})(); return r && r.share > 0.6 ? r : null;"),
            Duration::from_secs(60),
        )
        .await;
    let painted = t.elapsed();
    assert_eq!(browser.eval("return document.getElementById('status').textContent").await, "connected");
    assert!(seen["width"].as_u64().unwrap() >= 640 && seen["height"].as_u64().unwrap() >= 480, "the whole desktop: {seen}");
    browser.screenshot(&artifacts().join("session-page.png")).await;

    // Time left counts down from the expiry set above; Extend adds 15 minutes to what is left.
    browser
        .wait_for("time left", r"return /^0:(09|10):\d\d$/.test(document.getElementById('timeleft').textContent)", Duration::from_secs(5))
        .await;
    browser.click("#extend").await;
    until("the extension reaches the hive", Duration::from_secs(10), || async {
        let (_, s) = api(reqwest::Method::GET, &format!("/api/v1/pools/default/sessions/{id}"), None).await;
        (s["expires_at"].as_u64()? >= expires_at + 14 * 60 * 1000).then_some(())
    })
    .await;
    browser
        .wait_for(
            "the page shows the time left after the extension",
            r"return /^0:2[45]:\d\d$/.test(document.getElementById('timeleft').textContent)",
            Duration::from_secs(5),
        )
        .await;

    // A rating of 4 stars through the form.
    browser.click("#stars input[value='4']").await;
    browser.click("#rating button[type=submit]").await;
    browser
        .wait_for("the rating is taken", "return document.getElementById('rated').textContent.includes('4 of 5')", Duration::from_secs(10))
        .await;
    assert_eq!(browser.eval("return document.getElementById('error').textContent").await, "");

    // Release: the page says so, and the session is gone from the API.
    browser.click("#release").await;
    browser
        .wait_for("the page says released", "return document.getElementById('status').textContent === 'released'", Duration::from_secs(10))
        .await;
    let (s, body) = api(reqwest::Method::GET, &format!("/api/v1/pools/default/sessions/{id}"), None).await;
    assert_eq!(s, 404, "the released session is gone: {body}");
    assert!(browser.eval("return document.querySelector('#screen canvas') === null").await == true, "the desktop is no longer shown");
    eprintln!(
        "session page: VM locked and home page loaded {:.1}s after start; noVNC painted it {:.1}s after opening the page; total {:.1}s",
        locked.as_secs_f64(),
        painted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Without noVNC the page still loads, says what is missing, shows the time left and releases.
#[tokio::test]
async fn without_novnc_the_page_says_what_is_missing_and_still_releases() {
    let missing = tempfile::tempdir().unwrap();
    let nowhere = missing.path().join("novnc");
    let app = TestApp::builder().configure(|c| c.web.novnc_dir = Some(nowhere.clone())).spawn().await;
    let (_batch, handle, _vm) = app.held_vm(1, 2).await;

    let r = app.get("/static/novnc/core/rfb.js").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("run scripts/build-web.sh"), "{body}");

    let browser = Browser::start().await;
    browser.open(&format!("{}/sessions/default.{handle}", app.base)).await;
    browser
        .wait_for(
            "the page names what is missing",
            "return document.getElementById('error').textContent.includes('noVNC is not installed: run scripts/build-web.sh (needs npm)')",
            Duration::from_secs(10),
        )
        .await;
    // A session nobody extended has no expiry of its own: it counts down to the pool's longest
    // session (5 h by default), and there is nothing to extend.
    let s = app.json(&format!("/api/v1/pools/default/sessions/{handle}")).await;
    assert!(s["expires_at"].is_null() && s["ends_at"].is_u64(), "{s}");
    browser
        .wait_for(
            "the time left to the longest session",
            r"return /^[45]:\d\d:\d\d$/.test(document.getElementById('timeleft').textContent)",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(browser.eval("return document.getElementById('extend').disabled").await, true);
    browser.wait_for("release is enabled", "return !document.getElementById('release').disabled", Duration::from_secs(10)).await;
    browser.click("#release").await;
    browser
        .wait_for("the page says released", "return document.getElementById('status').textContent === 'released'", Duration::from_secs(10))
        .await;
    assert_eq!(app.get(&format!("/api/v1/pools/default/sessions/{handle}")).await.status(), 404);
    drop(browser);
    app.stop().await;
}

/// noVNC's modules come from the npm package as JavaScript; the page from any `{pool}.{id}`.
#[tokio::test]
async fn novnc_modules_are_served_as_javascript() {
    let app = TestApp::spawn().await;
    let r = app.get("/static/novnc/core/rfb.js").await;
    assert_eq!(r.status(), 200, "run scripts/build-web.sh");
    assert_eq!(r.headers()["content-type"], "text/javascript; charset=utf-8");
    assert!(r.text().await.unwrap().contains("export default class RFB"));
    assert_eq!(app.get("/static/novnc/core/nothing.js").await.status(), 404);
    let page = app.get("/sessions/default.7").await;
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/static/novnc/core/rfb.js"));
    assert_eq!(app.get("/sessions/default").await.status(), 404);
    app.stop().await;
}

fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
