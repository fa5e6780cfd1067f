//! `hive ctl migration`: sources and destinations (the endpoints a VM moves between), the
//! resources discovered at a source, and migrations themselves, over `/api/v1/migration*`.
//! `create --wait` and `show --follow` poll the migration until it finishes, with its progress
//! and current event on a bar on stderr; the final migration goes to stdout as JSON, and an end
//! other than Completed becomes `CtlError::MigrationFailed` (a non-zero exit).

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Client, CtlError, pretty};
use crate::domain::migration::{Migration, Resource, Status};

/// How often `--wait` and `--follow` ask for the migration again.
const POLL: Duration = Duration::from_millis(500);

#[derive(Subcommand)]
pub enum MigrationCmd {
    /// Start migrating a discovered resource to a destination.
    Create(CreateArgs),
    /// List migrations.
    List,
    /// Show one migration as JSON.
    Show {
        id: u64,
        /// Follow its progress until it finishes; exits non-zero unless it completes.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a migration that has not finished.
    Cancel { id: u64 },
    /// Delete a finished migration.
    Delete { id: u64 },
    /// Where VMs come from: add, list, discover.
    #[command(subcommand)]
    Source(SourceCmd),
    /// Where VMs go: add, list.
    #[command(subcommand)]
    Destination(DestinationCmd),
}

#[derive(Subcommand)]
pub enum SourceCmd {
    /// Register a source, e.g. `--type file --param dir=/exports`.
    Add {
        #[arg(long)]
        name: String,
        /// The driver: file, http, libvirt, vmware, hyperv, virtualbox.
        #[arg(long = "type")]
        kind: String,
        #[command(flatten)]
        params: ParamArgs,
    },
    /// List sources.
    List,
    /// Ask a source what it holds now; prints its resources.
    Discover { id: u64 },
}

#[derive(Subcommand)]
pub enum DestinationCmd {
    /// Register a destination, e.g. `--param node=2` to boot on node 2.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long = "type", default_value = "hive")]
        kind: String,
        #[command(flatten)]
        params: ParamArgs,
    },
    /// List destinations.
    List,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub name: String,
    /// The resource to migrate (see `migration source discover`).
    #[arg(long = "resource")]
    pub resource_id: u64,
    /// The destination to migrate to.
    #[arg(long = "destination")]
    pub destination_id: u64,
    #[arg(long)]
    pub description: Option<String>,
    /// Follow the migration until it finishes; exits non-zero unless it completes.
    #[arg(long)]
    pub wait: bool,
}

/// An endpoint's connection parameters: a JSON object, then `key=value` pairs over it.
#[derive(Args)]
pub struct ParamArgs {
    /// A parameter, repeatable. The value is JSON if it parses as JSON (true, 123), else a string.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub param: Vec<(String, Value)>,
    /// All parameters as one JSON object; `--param` entries override its keys.
    #[arg(long, value_name = "JSON")]
    pub params_json: Option<String>,
}

impl ParamArgs {
    fn object(&self) -> Result<Value, CtlError> {
        let mut params = match &self.params_json {
            None => Map::new(),
            Some(text) => match serde_json::from_str(text) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Err(CtlError::Usage("--params-json: a JSON object is required".into())),
                Err(e) => return Err(CtlError::Usage(format!("--params-json: {e}"))),
            },
        };
        params.extend(self.param.iter().cloned());
        Ok(Value::Object(params))
    }
}

fn parse_param(s: &str) -> Result<(String, Value), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{s:?}: the key is empty"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

/// The endpoint view the hive answers (parameters redacted).
#[derive(Deserialize)]
struct EndpointRow {
    id: u64,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    state: String,
    #[serde(default)]
    params: Value,
}

pub(super) async fn run(client: &Client, cmd: MigrationCmd) -> Result<(), CtlError> {
    let client = client.admin()?;
    match cmd {
        MigrationCmd::Create(a) => {
            let body = json!({
                "name": a.name, "description": a.description.unwrap_or_default(),
                "resource_id": a.resource_id, "destination_id": a.destination_id,
            });
            let m: Migration = client.call(Method::POST, "/api/v1/migrations", Some(body.to_string().into_bytes())).await?;
            if a.wait {
                return follow(client, m).await;
            }
            println!("{}", pretty(&m));
        }
        MigrationCmd::List => {
            let list: Vec<Migration> = client.call(Method::GET, "/api/v1/migrations", empty()).await?;
            println!("{:>6}  {:<10}  {:<24}  {:>4}  {:>6}  NAME", "ID", "STATUS", "EVENT", "%", "WORKER");
            for m in list {
                let worker = m.worker.map(|w| w.to_string()).unwrap_or_else(|| "-".into());
                println!("{:>6}  {:<10}  {:<24}  {:>3}%  {:>6}  {}", m.id, m.status.name(), m.event.label(), m.progress, worker, m.name);
            }
        }
        MigrationCmd::Show { id, follow: true } => {
            let m = get(client, id).await?;
            return follow(client, m).await;
        }
        MigrationCmd::Show { id, follow: false } => println!("{}", pretty(&get(client, id).await?)),
        MigrationCmd::Cancel { id } => {
            let m: Migration = client.call(Method::POST, &format!("/api/v1/migrations/{id}/cancel"), None).await?;
            println!("{}", pretty(&m));
        }
        MigrationCmd::Delete { id } => {
            client.send(Method::DELETE, &format!("/api/v1/migrations/{id}"), None).await?;
            println!("deleted migration {id}");
        }
        MigrationCmd::Source(SourceCmd::Add { name, kind, params }) => add(client, "migration-sources", name, kind, &params).await?,
        MigrationCmd::Source(SourceCmd::List) => endpoints(client, "migration-sources").await?,
        MigrationCmd::Source(SourceCmd::Discover { id }) => {
            let found: Vec<Resource> = client.call(Method::POST, &format!("/api/v1/migration-sources/{id}/discover"), None).await?;
            println!("{:>6}  {:<8}  {:<8}  {:<24}  ID AT SOURCE", "ID", "KIND", "MIGRATED", "NAME");
            for r in found {
                let migrated = if r.migrated { "yes" } else { "no" };
                println!("{:>6}  {:<8}  {:<8}  {:<24}  {}", r.id, r.kind.name(), migrated, r.name, r.id_at_source);
            }
        }
        MigrationCmd::Destination(DestinationCmd::Add { name, kind, params }) => {
            add(client, "migration-destinations", name, kind, &params).await?
        }
        MigrationCmd::Destination(DestinationCmd::List) => endpoints(client, "migration-destinations").await?,
    }
    Ok(())
}

/// An empty body, sent with `Content-Length: 0`: the hive's list routes share a filter with
/// their POST that reads a body whatever the method, and it refuses a request without a length.
fn empty() -> Option<Vec<u8>> {
    Some(Vec::new())
}

async fn get(client: &Client, id: u64) -> Result<Migration, CtlError> {
    client.call(Method::GET, &format!("/api/v1/migrations/{id}"), None).await
}

async fn add(client: &Client, segment: &str, name: String, kind: String, params: &ParamArgs) -> Result<(), CtlError> {
    let body = json!({"name": name, "type": kind, "params": params.object()?});
    let created: Value = client.call(Method::POST, &format!("/api/v1/{segment}"), Some(body.to_string().into_bytes())).await?;
    println!("{}", pretty(&created));
    Ok(())
}

async fn endpoints(client: &Client, segment: &str) -> Result<(), CtlError> {
    let list: Vec<EndpointRow> = client.call(Method::GET, &format!("/api/v1/{segment}"), empty()).await?;
    println!("{:>6}  {:<10}  {:<8}  {:<24}  PARAMS", "ID", "TYPE", "STATE", "NAME");
    for e in list {
        println!("{:>6}  {:<10}  {:<8}  {:<24}  {}", e.id, e.kind, e.state, e.name, e.params);
    }
    Ok(())
}

/// Poll `m` until it finishes, then print it; anything but Completed is an error.
async fn follow(client: &Client, mut m: Migration) -> Result<(), CtlError> {
    let bar = bar();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        bar.set_position(m.progress.into());
        bar.set_message(m.event.label());
        if m.status.is_finished() {
            break;
        }
        tick.tick().await;
        m = get(client, m.id).await?;
    }
    bar.finish_and_clear();
    println!("{}", pretty(&m));
    match m.status {
        Status::Completed => Ok(()),
        status => Err(CtlError::MigrationFailed { id: m.id, status: status.name(), error: m.error }),
    }
}

fn bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("[{bar:40}] {pos:>3}% {msg} ({elapsed})")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr()).with_style(style)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_param_value_is_json_when_it_parses_and_a_string_otherwise() {
        assert_eq!(parse_param("in_place=true"), Ok(("in_place".into(), json!(true))));
        assert_eq!(parse_param("node=3"), Ok(("node".into(), json!(3))));
        assert_eq!(parse_param("dir=/srv/exports"), Ok(("dir".into(), json!("/srv/exports"))));
        assert_eq!(parse_param("uri=qemu:///system?a=b"), Ok(("uri".into(), json!("qemu:///system?a=b"))));
        assert_eq!(parse_param("empty="), Ok(("empty".into(), json!(""))));
        assert!(parse_param("novalue").is_err());
        assert!(parse_param("=x").is_err());
    }

    #[test]
    fn params_merge_json_then_pairs_and_refuse_a_non_object() {
        let args =
            ParamArgs { param: vec![("in_place".into(), json!(true))], params_json: Some(r#"{"dir": "/a", "in_place": false}"#.into()) };
        assert_eq!(args.object().unwrap(), json!({"dir": "/a", "in_place": true}));
        let args = ParamArgs { param: vec![], params_json: Some("[1]".into()) };
        assert!(matches!(args.object(), Err(CtlError::Usage(m)) if m.contains("object")));
        let args = ParamArgs { param: vec![], params_json: None };
        assert_eq!(args.object().unwrap(), json!({}));
    }
}
