//! `hive ctl`: a command-line client of the hive's HTTP API (images here; migrations in
//! `ctl_migration.rs`, moves of pool VMs in `ctl_vm.rs`). Long work shows a progress bar on stderr, hidden when stderr is not a
//! terminal; results go to stdout. A refusal from the hive becomes `CtlError::Hive` carrying its
//! code and message, and a non-zero exit.
//! `image upload` hashes the file, creates the upload or resumes the one the hive already has
//! for that content (from the offset the hive reports), sends chunks and completes it.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{Method, RequestBuilder};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::images::{ImageView, UploadSpec, UploadView};

#[path = "ctl_migration.rs"]
pub mod migration;
#[path = "ctl_vm.rs"]
pub mod vm;

/// Consecutive `offset_mismatch` answers tolerated (another client moved the upload) before giving up.
const MAX_REALIGN: u32 = 3;

#[derive(Args)]
pub struct CtlArgs {
    /// Base URL of the hive.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    pub hive: String,
    /// Admin token; else $HIVE_ADMIN_TOKEN, else the file <data-dir>/admin-token.
    #[arg(long, global = true, env = "HIVE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where `hive up` saved its admin token.
    #[arg(long, global = true, default_value = "hive-data")]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

#[derive(Subcommand)]
pub enum CtlCmd {
    /// VM images: upload, list, show, delete.
    #[command(subcommand)]
    Image(ImageCmd),
    /// VM migrations, and the sources and destinations they move between.
    #[command(subcommand)]
    Migration(migration::MigrationCmd),
    /// A pool's VMs: move one to another node.
    #[command(subcommand)]
    Vm(vm::VmCmd),
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Upload FILE as an image; run it again to resume an interrupted upload.
    Upload(UploadArgs),
    /// List the hive's images.
    List,
    /// Show one image as JSON.
    Show { sha256: String },
    /// Delete an image and its blob.
    Delete { sha256: String },
}

#[derive(Args)]
pub struct UploadArgs {
    pub file: PathBuf,
    #[arg(long)]
    pub name: String,
    /// A text file describing the image.
    #[arg(long)]
    pub readme: Option<PathBuf>,
    #[arg(long)]
    pub cores: u32,
    #[arg(long)]
    pub ram_mb: u64,
    #[arg(long)]
    pub disk_mb: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{code}: {message} (HTTP {status})")]
    Hive { status: u16, code: String, message: String },
    #[error("cannot reach the hive at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("no admin token: pass --token, set HIVE_ADMIN_TOKEN, or point --data-dir at a directory holding admin-token ({0})")]
    NoToken(String),
    #[error("unexpected answer from the hive: {0}")]
    Protocol(String),
    #[error("{0}")]
    Usage(String),
    #[error("migration {id} ended {status}{}", .error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    MigrationFailed { id: u64, status: &'static str, error: Option<String> },
    #[error("the move of VM {vm} failed: {error} ({})", if *.restored { "it runs where it was" } else { "it is lost and will be replaced" })]
    MoveFailed { vm: u64, error: String, restored: bool },
}

/// Run one command; print a failure on stderr. The process exit code: 0 on success, else 1.
pub async fn main(args: CtlArgs) -> i32 {
    match run(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    let client = Client::new(&args);
    match args.cmd {
        CtlCmd::Image(ImageCmd::Upload(a)) => {
            let image = upload(client.admin()?, &a).await?;
            println!("{}", pretty(&image));
        }
        CtlCmd::Image(ImageCmd::List) => {
            let images: Vec<ImageView> = client.call(Method::GET, "/api/v1/images", None).await?;
            println!("{:<64}  {:>14}  {:>7}  NAME", "SHA256", "SIZE", "PIECES");
            for i in images {
                println!("{:<64}  {:>14}  {:>7}  {}", i.sha256, i.size, i.pieces, i.name);
            }
        }
        CtlCmd::Image(ImageCmd::Show { sha256 }) => {
            let image: Value = client.call(Method::GET, &format!("/api/v1/images/{sha256}"), None).await?;
            println!("{}", pretty(&image));
        }
        CtlCmd::Image(ImageCmd::Delete { sha256 }) => {
            client.admin()?.send(Method::DELETE, &format!("/api/v1/images/{sha256}"), None).await?;
            println!("deleted {sha256}");
        }
        CtlCmd::Migration(cmd) => migration::run(&client, cmd).await?,
        CtlCmd::Vm(cmd) => vm::run(&client, cmd).await?,
    }
    Ok(())
}

async fn upload(client: &Client, a: &UploadArgs) -> Result<ImageView, CtlError> {
    let file_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| CtlError::File { path, source }
    };
    let size = std::fs::metadata(&a.file).map_err(file_err(&a.file))?.len();
    let readme = match &a.readme {
        Some(p) => Some(std::fs::read_to_string(p).map_err(file_err(p))?),
        None => None,
    };
    let bar = progress(size, "hashing");
    let (path, hashing) = (a.file.clone(), bar.clone());
    let sha256 = tokio::task::spawn_blocking(move || hash_file(&path, |n| hashing.inc(n)))
        .await
        .map_err(|e| CtlError::Protocol(format!("hashing task failed: {e}")))?
        .map_err(file_err(&a.file))?;
    bar.finish_and_clear();

    let spec = UploadSpec { name: a.name.clone(), sha256, size, readme, cores: a.cores, ram_mb: a.ram_mb, disk_mb: a.disk_mb };
    let body = serde_json::to_vec(&spec).map_err(|e| CtlError::Protocol(e.to_string()))?;
    let mut up: UploadView = client.call(Method::POST, "/api/v1/images/uploads", Some(body)).await?;
    let chunk = up.chunk_max.max(1);
    let bar = progress(size, "uploading");
    bar.set_position(up.offset);
    let mut file = tokio::fs::File::open(&a.file).await.map_err(file_err(&a.file))?;
    let mut realigned = 0;
    while up.offset < size {
        let len = chunk.min(size - up.offset) as usize;
        let mut buf = vec![0u8; len];
        file.seek(std::io::SeekFrom::Start(up.offset)).await.map_err(file_err(&a.file))?;
        file.read_exact(&mut buf).await.map_err(file_err(&a.file))?;
        let path = format!("/api/v1/images/uploads/{}?offset={}", up.upload_id, up.offset);
        match client.call::<Value>(Method::PATCH, &path, Some(buf)).await {
            Ok(v) => {
                up.offset = v["offset"].as_u64().ok_or_else(|| CtlError::Protocol(format!("PATCH answered {v}")))?;
                realigned = 0;
            }
            Err(CtlError::Hive { code, .. }) if code == "offset_mismatch" && realigned < MAX_REALIGN => {
                realigned += 1;
                up = client.call(Method::GET, &format!("/api/v1/images/uploads/{}", up.upload_id), None).await?;
            }
            Err(e) => return Err(e),
        }
        bar.set_position(up.offset);
    }
    bar.finish_and_clear();
    client.call(Method::POST, &format!("/api/v1/images/uploads/{}/complete", up.upload_id), None).await
}

fn hash_file(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        progress(n as u64);
    }
}

fn progress(len: u64, what: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()).with_style(style);
    bar.set_message(what);
    bar
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<SecretString>,
    token_file: PathBuf,
}

impl Client {
    fn new(args: &CtlArgs) -> Client {
        let token_file = args.data_dir.join("admin-token");
        let token = args
            .token
            .clone()
            .or_else(|| std::fs::read_to_string(&token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .map(SecretString::from);
        Client { http: reqwest::Client::new(), base: args.hive.trim_end_matches('/').to_string(), token, token_file }
    }

    /// This client, if it has the admin token.
    fn admin(&self) -> Result<&Client, CtlError> {
        match self.token {
            Some(_) => Ok(self),
            None => Err(CtlError::NoToken(self.token_file.display().to_string())),
        }
    }

    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<T, CtlError> {
        let resp = self.send(method, path, body).await?;
        resp.json().await.map_err(|e| CtlError::Protocol(e.to_string()))
    }

    /// Send, turning any non-2xx answer into `CtlError::Hive` with the envelope's code and message.
    async fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<reqwest::Response, CtlError> {
        let url = format!("{}{path}", self.base);
        let mut req: RequestBuilder = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose_secret());
        }
        if let Some(b) = body {
            // Explicit even when 0: hyper leaves out `Content-Length: 0` on a GET, and the hive's
            // routes that read a body for every method refuse a request without a length.
            req = req.header(reqwest::header::CONTENT_LENGTH, b.len()).body(b);
        }
        let resp = req.send().await.map_err(|e| CtlError::Unreachable { url: self.base.clone(), reason: chain(&e) })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let envelope: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let field = |k: &str| envelope["error"][k].as_str().map(str::to_string);
        Err(CtlError::Hive {
            status: status.as_u16(),
            code: field("code").unwrap_or_else(|| "http_error".into()),
            message: field("message").unwrap_or(text),
        })
    }
}

/// An error and its causes, `outer: inner: …` (reqwest's own message omits the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}
