//! `hive ctl vm`: moving a pool's VM to another node over `/api/v1/pools/{pool}/vms/{vm}/move`.
//! `move --wait` and `move-status --follow` poll the move until it ends, with a spinner on
//! stderr; the final move goes to stdout as JSON, and a failed move becomes
//! `CtlError::MoveFailed` (a non-zero exit), saying whether the VM runs where it was.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, CtlError, pretty};

/// How often `--wait` and `--follow` ask for the move again.
const POLL: Duration = Duration::from_millis(500);

#[derive(Subcommand)]
pub enum VmCmd {
    /// Move a pool's VM to another node: a free or ready VM cold, an occupied one live.
    Move {
        pool: String,
        vm: u64,
        /// The node to move it to.
        #[arg(long)]
        node: u64,
        /// Follow the move until it ends; exits non-zero unless it is done.
        #[arg(long)]
        wait: bool,
    },
    /// Show a VM's last move as JSON.
    MoveStatus {
        pool: String,
        vm: u64,
        /// Follow it until it ends; exits non-zero unless it is done.
        #[arg(long)]
        follow: bool,
    },
}

pub(super) async fn run(client: &Client, cmd: VmCmd) -> Result<(), CtlError> {
    let client = client.admin()?;
    let (pool, vm, follow) = match cmd {
        VmCmd::Move { pool, vm, node, wait } => {
            let body = serde_json::to_vec(&json!({ "node": node })).unwrap_or_default();
            let started: Value = client.call(Method::POST, &path(&pool, vm), Some(body)).await?;
            if !wait {
                println!("{}", pretty(&started));
                return Ok(());
            }
            (pool, vm, true)
        }
        VmCmd::MoveStatus { pool, vm, follow } => (pool, vm, follow),
    };
    let mut m: Value = client.call(Method::GET, &path(&pool, vm), None).await?;
    if follow {
        let bar = spinner(&m);
        while m["status"] == "moving" {
            tokio::time::sleep(POLL).await;
            m = client.call(Method::GET, &path(&pool, vm), None).await?;
            bar.tick();
        }
        bar.finish_and_clear();
    }
    println!("{}", pretty(&m));
    match m["status"].as_str() {
        Some("failed") if follow => Err(CtlError::MoveFailed {
            vm,
            error: m["error"].as_str().unwrap_or("no cause given").to_string(),
            restored: m["restored"].as_bool().unwrap_or(false),
        }),
        _ => Ok(()),
    }
}

fn path(pool: &str, vm: u64) -> String {
    let pool = percent_encoding::utf8_percent_encode(pool, percent_encoding::NON_ALPHANUMERIC);
    format!("/api/v1/pools/{pool}/vms/{vm}/move")
}

fn spinner(m: &Value) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    bar.set_message(format!("moving VM {} from node {} to node {} ({})", m["vm"], m["from"], m["to"], m["mode"].as_str().unwrap_or("")));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
