//! The end user's page for one session, `GET /sessions/{pool}.{id}` (`web/session.html`): the
//! desktop through noVNC over the gateway, time left, extend, release and a rating. noVNC's ES
//! modules are served from `GET /static/novnc/{path}`, out of the npm package that
//! `scripts/build-web.sh` installs; the repository does not carry a copy. Without it the page
//! still loads and says what is missing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::reply;
use crate::app::Hive;

const SESSION_HTML: &str = include_str!("../../web/session.html");
/// Where `scripts/build-web.sh` installs noVNC, relative to the repository.
const NOVNC_IN_REPO: &str = "web/node_modules/@novnc/novnc";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// noVNC's package directory (the one holding `core/rfb.js`). Unset: `web/node_modules/
    /// @novnc/novnc` under the current directory, else the same two levels above the binary
    /// (`target/debug/hive` in a checkout, as `cargo run` starts it).
    pub novnc_dir: Option<PathBuf>,
}

/// The noVNC directory to serve: the configured one, or the first default candidate that holds
/// noVNC (the current directory's when none does, so a later `build-web.sh` there is picked up).
fn novnc_dir(cfg: &WebConfig) -> PathBuf {
    if let Some(d) = &cfg.novnc_dir {
        return d.clone();
    }
    let here = PathBuf::from(NOVNC_IN_REPO);
    let by_binary = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join(NOVNC_IN_REPO)));
    [Some(here.clone()), by_binary].into_iter().flatten().find(|d| has_novnc(d)).unwrap_or(here)
}

fn has_novnc(dir: &Path) -> bool {
    dir.join("core").join("rfb.js").is_file()
}

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let dir = novnc_dir(&hive.config().web);
    if has_novnc(&dir) {
        tracing::debug!(dir = %dir.display(), "serving noVNC");
    } else {
        tracing::warn!(dir = %dir.display(), "noVNC is not installed: session pages cannot show desktops (run scripts/build-web.sh)");
    }
    let page = warp::path!("sessions" / String).and(warp::get()).map(session_page);
    let missing = dir.clone();
    let novnc = warp::path!("static" / "novnc" / ..).and(warp::get()).and(
        warp::fs::dir(dir).map(|f: warp::fs::File| javascript(f.into_response())).or(warp::any().map(move || not_served(&missing))).unify(),
    );
    page.or(novnc).unify().boxed()
}

/// The page for `{pool}.{id}`; any other name is no route (the page itself reports a session
/// that does not exist).
fn session_page(sid: String) -> Response {
    let named = sid.rsplit_once('.').is_some_and(|(pool, id)| !pool.is_empty() && id.parse::<u64>().is_ok());
    if !named {
        return super::ApiError::NoRoute.into_response();
    }
    let mut r = Response::new(SESSION_HTML.into());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// 404 for a path under `/static/novnc/` that is not a file there, saying so when noVNC is not
/// installed at all.
fn not_served(dir: &Path) -> Response {
    let message = if has_novnc(dir) {
        "no such file in noVNC".to_string()
    } else {
        format!("noVNC is not installed at {}: run scripts/build-web.sh (needs npm)", dir.display())
    };
    reply::json_status(StatusCode::NOT_FOUND, &json!({"error": {"code": "not_found", "message": message}}))
}

/// Module scripts must come as JavaScript; say so whatever the MIME table answers.
fn javascript(mut r: Response) -> Response {
    let js = r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("javascript"));
    if js {
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
    }
    r
}
