//! `Hive`: the control plane assembled from config: store, group-commit writer, image registry,
//! simulated nodes (if any), the supervised actor tree, and the metrics recorder. `hive up`, `hive serve`
//! and the tests all start it the same way; the HTTP layer (`http::serve`) only borrows it.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use ractor::Actor;
use secrecy::SecretString;

use crate::actors::node::{NodeError, NodeRegistryHandle, NodeSpec, NodeView};
use crate::actors::pool::{PoolError, PoolHandle};
use crate::actors::supervisor::{HiveHandle, HiveSupervisor, PoolDirectory, PoolTemplate, SupervisorArgs};
use crate::actors::{Clock, RestartPolicy};
use crate::config::HiveConfig;
use crate::coord::Coordinator;
use crate::domain::NodeId;
use crate::domain::node::{AdminState, NodeClass};
use crate::domain::pool::PoolSize;
use crate::drivers::VmSpec;
use crate::drivers::sim::SimHypervisor;
use crate::images::ImageRegistry;
use crate::lifecycle::Lifecycle;
use crate::store::{self, Change, NodeRecord, StoreError, StoreWriter};

#[derive(Debug, thiserror::Error)]
pub enum HiveError {
    #[error("cannot create data directory {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("actor tree failed to start: {0}")]
    Start(String),
}

#[derive(Clone)]
pub struct Hive {
    inner: Arc<HiveInner>,
}

struct HiveInner {
    config: HiveConfig,
    admin_token: Option<SecretString>,
    pools: PoolDirectory,
    nodes: NodeRegistryHandle,
    supervisor: HiveHandle,
    writer: StoreWriter,
    images: ImageRegistry,
    lifecycle: Lifecycle,
    sims: Vec<(NodeId, Arc<SimHypervisor>)>,
    metrics: Option<PrometheusHandle>,
    clock: Clock,
    coord: Arc<dyn Coordinator>,
    instance: String,
    gateway_key: crate::gateway::GatewayKey,
    guacamole: Option<Arc<crate::guacamole::Guacamole>>,
    migrations: crate::migration::service::Migrations,
    /// `rest` mode: the connections kept in step with the VMs.
    guacamole_sync: Option<Arc<crate::guacamole::ConnectionSync>>,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Hive {
    /// Open the store, register the simulated nodes, start the actor tree.
    pub async fn start(config: HiveConfig) -> Result<Hive, HiveError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| HiveError::DataDir(config.data_dir.display().to_string(), e))?;
        let metrics = crate::metrics::install();
        let store = store::open(&config.database_url()).await?;
        let timeout = Duration::from_millis(config.call_timeout_ms);
        let clock = Clock::new();
        let images = ImageRegistry::open(store.clone(), &config.data_dir, &config.images, clock)
            .await
            .map_err(|e| HiveError::Start(format!("image registry: {e}")))?;
        let writer = StoreWriter::spawn(store);

        let timings = config.node.timings();
        let nodes = NodeRegistryHandle::new(timeout, Duration::from_millis(config.node.command_timeout_ms));
        let stored = writer.store().load_nodes().await?;
        let (sims, node_specs) = simulated_nodes(&config, &stored, &writer, clock).await?;

        let coord = crate::coord::from_config(&config.coord).map_err(|e| HiveError::Start(e.to_string()))?;
        if coord.kind() != "local" && (config.sim.nodes > 0 || config.cloud.nodes > 0) {
            // A pool moves to another instance when its lease does; VMs on a simulator inside
            // this process would be lost to it.
            return Err(HiveError::Start(
                "simulated nodes (sim.nodes, cloud.nodes) live inside one process and cannot serve several instances: \
                 set them to 0 and run `hive node --driver sim --hive <every instance>` agents instead"
                    .into(),
            ));
        }
        if coord.kind() != "local" && config.database_url().starts_with("sqlite:") {
            tracing::warn!("a Redis coordinator with a SQLite store: several instances need a shared Postgres database");
        }
        let instance = instance_id(&config);
        tracing::info!(coordinator = coord.kind(), %instance, "coordination");
        let restart = RestartPolicy { max: config.supervision.max_restarts, window: Duration::from_secs(config.supervision.window_secs) };
        let pools = PoolDirectory::default();
        let guacamole = crate::guacamole::Guacamole::from_config(&config.guacamole)
            .map_err(|e| HiveError::Start(format!("guacamole: {e}")))?
            .map(Arc::new);
        let guacamole_sync =
            guacamole.clone().and_then(|g| crate::guacamole::ConnectionSync::start(g, config.guacamole.grant_group.clone()));
        let template = PoolTemplate {
            hooks: guacamole_sync.clone().map(|s| s as Arc<dyn crate::actors::pool::VmHooks>),
            rules: config.pool_rules(),
            writer: writer.clone(),
            vm_spec: VmSpec {
                name: "vm".into(),
                template: config.vm.template.clone(),
                cores: config.vm.cores,
                ram_mb: config.vm.ram_mb,
                disk_mb: config.vm.disk_mb,
            },
            ping_interval: Duration::from_millis(config.pool.ping_interval_ms),
            restart,
            clock,
            call_timeout: timeout,
            images: Some(images.clone()),
        };
        let args = SupervisorArgs {
            pools: pools.clone(),
            nodes: nodes.clone(),
            node_specs,
            template,
            default_size: config.pool.default_size,
            node_timings: timings,
            placement_top_k: config.node.placement_top_k,
            coord: coord.clone(),
            instance: instance.clone(),
            lease_ttl: Duration::from_millis(config.coord.lease_ttl_ms),
        };
        let (actor, join) = Actor::spawn(None, HiveSupervisor, args).await.map_err(|e| HiveError::Start(e.to_string()))?;
        let (tx, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = join.await;
            let _ = tx.send(true);
        });
        // Lifecycle VMs take the configured resources; their template comes from the baseimage.
        let v = &config.vm;
        let lifecycle_vm =
            VmSpec { name: "lifecycle".into(), template: String::new(), cores: v.cores, ram_mb: v.ram_mb, disk_mb: v.disk_mb };
        let boot_timeout = Duration::from_millis(config.pool.timeouts_ms.booting);
        let lifecycle = Lifecycle::open(writer.store().clone(), nodes.clone(), lifecycle_vm, boot_timeout, clock)
            .await
            .map_err(|e| HiveError::Start(format!("lifecycle: {e}")))?;
        let admin_token = config.admin_token.clone();
        let gateway_key = crate::gateway::GatewayKey::new(admin_token.as_ref());
        let migrations = crate::migration::service::Migrations::new(writer.store().clone(), nodes.clone(), clock);
        let resumed = migrations.clone();
        tokio::spawn(async move { resumed.resume().await });
        tokio::spawn(migrations.clone().heartbeats());
        Ok(Hive {
            inner: Arc::new(HiveInner {
                supervisor: HiveHandle::new(actor, timeout),
                config,
                admin_token,
                pools,
                nodes,
                writer,
                images,
                lifecycle,
                sims,
                metrics,
                clock,
                stopped,
                coord,
                instance,
                gateway_key,
                guacamole,
                guacamole_sync,
                migrations,
            }),
        })
    }

    /// The Guacamole in front of the VMs, when one is configured.
    pub fn guacamole(&self) -> Option<&Arc<crate::guacamole::Guacamole>> {
        self.inner.guacamole.as_ref()
    }

    /// Migrations, their endpoints and resources.
    pub fn migrations(&self) -> &crate::migration::service::Migrations {
        &self.inner.migrations
    }

    /// In Guacamole's `rest` mode, the connections the pools keep per prepared VM.
    pub fn guacamole_sync(&self) -> Option<&Arc<crate::guacamole::ConnectionSync>> {
        self.inner.guacamole_sync.as_ref()
    }

    /// Signs and checks the gateway's tokens.
    pub fn gateway_key(&self) -> &crate::gateway::GatewayKey {
        &self.inner.gateway_key
    }

    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.inner.coord
    }

    /// This process among the hive's instances: `<advertised URL>#<random>`.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// The base URL the other instances forward to this one at.
    pub fn advertised_url(&self) -> &str {
        crate::actors::supervisor::instance_url(&self.inner.instance)
    }

    pub fn config(&self) -> &HiveConfig {
        &self.inner.config
    }

    pub fn admin_token(&self) -> Option<&SecretString> {
        self.inner.admin_token.as_ref()
    }

    pub fn now(&self) -> crate::domain::Millis {
        self.inner.clock.now()
    }

    pub fn pool(&self, name: &str) -> Result<PoolHandle, PoolError> {
        self.inner.pools.get(name)
    }

    pub fn pools(&self) -> Vec<PoolHandle> {
        self.inner.pools.list()
    }

    pub async fn create_pool(&self, name: &str, size: PoolSize) -> Result<PoolHandle, PoolError> {
        self.inner.supervisor.create_pool(name, size).await
    }

    pub async fn delete_pool(&self, name: &str) -> Result<(), PoolError> {
        self.inner.supervisor.delete_pool(name).await
    }

    pub fn nodes_handle(&self) -> &NodeRegistryHandle {
        &self.inner.nodes
    }

    pub fn store(&self) -> &Arc<dyn store::Store> {
        self.inner.writer.store()
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>, NodeError> {
        self.inner.nodes.list().await
    }

    pub async fn node(&self, id: NodeId) -> Result<NodeView, NodeError> {
        self.inner.nodes.get(id).await
    }

    pub fn images(&self) -> &ImageRegistry {
        &self.inner.images
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    /// The simulated hypervisor of node `id` (failure injection in tests and demos).
    pub fn sim(&self, id: NodeId) -> Option<Arc<SimHypervisor>> {
        self.inner.sims.iter().find(|(n, _)| *n == id).map(|(_, s)| s.clone())
    }

    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.inner.metrics.as_ref()
    }

    /// Is the store reachable?
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.inner.writer.store().ping().await
    }

    /// Resolves when the actor tree has stopped (after `stop`, or because it gave up).
    pub async fn stopped(&self) {
        let mut rx = self.inner.stopped.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub async fn stop(&self) {
        self.inner.supervisor.stop();
        self.stopped().await;
    }
}

/// The simulated nodes of `hive up` (class participant, ids from 1) and the simulated cloud
/// capacity (class cloud, ids from 5001), recorded in the store. An admin's cordon or drain of
/// a simulated node survives a restart.
async fn simulated_nodes(
    config: &HiveConfig,
    stored: &[NodeRecord],
    writer: &StoreWriter,
    clock: Clock,
) -> Result<(Vec<(NodeId, Arc<SimHypervisor>)>, Vec<NodeSpec>), HiveError> {
    let sim_dir = config.data_dir.join("sim");
    let mut plan: Vec<(NodeId, String, NodeClass, u32, u64, u64)> = Vec::new();
    for i in 1..=config.sim.nodes {
        plan.push((NodeId::from(i), format!("sim-{i}"), NodeClass::Participant, config.sim.cores, config.sim.ram_mb, config.sim.disk_mb));
    }
    for i in 1..=config.cloud.nodes {
        let c = &config.cloud;
        plan.push((5000 + NodeId::from(i), format!("cloud-sim-{i}"), NodeClass::Cloud, c.cores, c.ram_mb, c.disk_mb));
    }
    if !plan.is_empty() {
        std::fs::create_dir_all(&sim_dir).map_err(|e| HiveError::DataDir(sim_dir.display().to_string(), e))?;
    }
    let (mut sims, mut specs, mut records) = (Vec::new(), Vec::new(), Vec::new());
    for (id, name, class, cores, ram_mb, disk_mb) in plan {
        let net = (id % 250) as u8;
        let sim = Arc::new(SimHypervisor::new(&name, net, config.sim.timings.clone(), Some(sim_dir.join(format!("{name}.json")))));
        let admin = stored.iter().find(|r| r.id == id).and_then(|r| AdminState::parse(&r.admin)).unwrap_or_default();
        let spec = NodeSpec {
            id,
            name,
            address: format!("127.0.{net}.1"),
            cores,
            ram_mb,
            disk_mb,
            class,
            admin,
            driver: sim.clone(),
            remote: None,
            driver_name: "sim".into(),
            credential_hash: None,
            created_at: clock.now(),
        };
        records.push(Change::Node(NodeRecord {
            id,
            name: spec.name.clone(),
            driver: "sim".into(),
            cores,
            ram_mb,
            disk_mb,
            address: spec.address.clone(),
            state: "ready".into(),
            created_at: spec.created_at,
            remote: false,
            class: class.name().into(),
            admin: admin.name().into(),
            credential_hash: None,
        }));
        specs.push(spec);
        sims.push((id, sim));
    }
    writer.write(records).await?;
    Ok((sims, specs))
}

/// `<advertised URL>#<random>`: the URL for forwarding, the random part so that an instance
/// restarted at the same address is a new lease holder.
fn instance_id(config: &HiveConfig) -> String {
    use rand::Rng;
    let url = config.coord.advertise_url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
    let nonce: u64 = rand::rng().random();
    format!("{}#{nonce:016x}", url.trim_end_matches('/'))
}
