//! The last step of a migration: the converted image, now in the hive's image registry, is
//! fetched by the destination node and installed there as a template (named by the
//! destination's `template` parameter, else after the migration), an instance of it is created
//! and started, and it must answer a guest ping (on libvirt: print the destination's `ready`
//! line on its console, when one is given) before the migration counts as done. The check
//! instance is then destroyed; the template stays, for pools to use (`vm.template`).

use std::time::Duration;

use serde_json::{Value, json};

use super::service::destination_node;
use crate::actors::node::NodeRegistryHandle;
use crate::domain::NodeId;
use crate::domain::migration::Endpoint;
use crate::drivers::{DriverError, VmSpec};

const FETCH_TIMEOUT: Duration = Duration::from_secs(3600);
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Boot `image` (the registry's answer to the upload) on `destination`; answers where.
pub async fn boot_check(nodes: &NodeRegistryHandle, destination: &Endpoint, image: &Value, name: &str) -> Result<Value, String> {
    let sha256 = image["sha256"].as_str().ok_or_else(|| format!("the upload's answer names no image: {image}"))?;
    let node = match destination_node(destination).map_err(|e| e.to_string())? {
        Some(n) => n,
        None => any_connected(nodes).await?,
    };
    let remote = nodes.remote(node);
    if !remote.connected() {
        return Err(format!("destination node {node} is not connected"));
    }
    let fetched =
        remote.fetch_image(sha256, Vec::new(), FETCH_TIMEOUT).await.map_err(|e| format!("node {node} fetching the image: {e}"))?;
    if !fetched.verified {
        return Err(format!("node {node} could not verify image {sha256}"));
    }
    let template = match destination.params.get("template").and_then(|t| t.as_str()) {
        Some(t) => t.to_string(),
        None => short(name),
    };
    let ready = destination.params.get("ready").and_then(|r| r.as_str()).map(str::to_string);
    remote
        .install_template_image(sha256, &template, ready)
        .await
        .map_err(|e| format!("node {node} installing template {template:?}: {e}"))?;
    let driver = nodes.driver(node).await.map_err(|e| format!("node {node}: {e}"))?;
    let spec = VmSpec { name: format!("migrated-{template}"), template: template.clone(), cores: 1, ram_mb: 512, disk_mb: 0 };
    let domain = driver.create(&spec).await.map_err(|e| format!("creating an instance on node {node}: {e}"))?;
    let checked = async {
        driver.start(&domain).await.map_err(|e| format!("starting the instance on node {node}: {e}"))?;
        let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
        loop {
            match driver.ping(&domain).await {
                Ok(status) => return Ok(status.ip),
                Err(DriverError::NotReady) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("the instance on node {node} did not come up: {e}")),
            }
        }
    }
    .await;
    if let Err(e) = driver.destroy(&domain).await {
        tracing::warn!(node, domain = %domain, error = %e, "could not destroy the migration's check instance");
    }
    let ip = checked?;
    Ok(json!({"node": node, "image": sha256, "template": template, "checked_instance": domain, "guest_ip": ip}))
}

/// A template name from a migration's name: the characters a template name allows.
fn short(name: &str) -> String {
    let t: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(60).collect();
    let t = t.trim_start_matches('.').to_string();
    if t.is_empty() { "migrated".into() } else { t }
}

async fn any_connected(nodes: &NodeRegistryHandle) -> Result<NodeId, String> {
    let list = nodes.list().await.map_err(|e| e.to_string())?;
    list.iter()
        .map(|n| n.id)
        .find(|id| nodes.remote(*id).connected())
        .ok_or_else(|| "no destination node is connected (set the destination's params.node, or connect an agent)".to_string())
}
