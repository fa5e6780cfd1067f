//! The `hive` binary: command-line parsing, config, tracing and the run loop. Nothing else.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use guaca_hive::app::Hive;
use guaca_hive::config::HiveConfig;
use secrecy::{ExposeSecret, SecretString};

#[derive(Parser)]
#[command(name = "hive", version, about = "guaca-hive: warm pools of virtual desktops and VMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything on one machine: control plane, SQLite store, simulated nodes.
    Up(UpArgs),
    /// The control plane alone (nodes join it; no simulated nodes).
    Serve(ServeArgs),
    /// A command-line client of a running hive's HTTP API.
    Ctl(guaca_hive::ctl::CtlArgs),
    /// The node agent: lend this host's CPU, RAM and disk to a hive.
    Node(Box<NodeArgs>),
}

#[derive(Args)]
struct NodeArgs {
    /// Base URL of the hive; several instances of one hive comma-separated, the first being
    /// the one to join through (the agent keeps a connection to each).
    #[arg(long, env = "HIVE_URL", default_value = "http://127.0.0.1:8080", value_delimiter = ',')]
    hive: Vec<String>,
    /// A join token from an admin (first run), or this node's credential. Read from the
    /// environment (HIVE_NODE_TOKEN) to keep it out of the process list.
    #[arg(long, env = "HIVE_NODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Hypervisor driver: `sim` (a simulator; no real VMs), `libvirt`, or `desktop` (desktops
    /// made of processes: Xvfb, x11vnc and a browser in kiosk mode).
    #[arg(long, default_value = "sim")]
    driver: String,
    /// Cores to lend (default: all logical CPUs).
    #[arg(long)]
    cores: Option<u32>,
    /// RAM to lend in MB (default: three quarters of the host's).
    #[arg(long)]
    ram_mb: Option<u64>,
    /// Disk to lend in MB (default: half the free space of the data directory's disk).
    #[arg(long)]
    disk_mb: Option<u64>,
    /// Where the credential and the hypervisor's state live.
    #[arg(long, default_value = "hive-node-data")]
    data_dir: PathBuf,
    /// Name shown in the hive (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Address at which this host's VMs (VNC) and piece server can be reached.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Where the piece server listens for peers (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    peer_listen: std::net::SocketAddr,
    /// Upload cap for serving pieces to peers, MB/s (default: none).
    #[arg(long)]
    upload_mbps: Option<u64>,
    /// Download cap for fetching pieces, MB/s (default: none).
    #[arg(long)]
    download_mbps: Option<u64>,
    /// Ready copies to keep of every image the node holds.
    #[arg(long, default_value_t = 2)]
    stock: usize,
    /// The hive cannot reach --address (NAT): it reaches the VMs' VNC through this agent's
    /// connection instead.
    #[arg(long)]
    behind_nat: bool,
    #[command(flatten)]
    libvirt: LibvirtArgs,
    #[command(flatten)]
    desktop: DesktopArgs,
}

/// `--driver desktop` only.
#[derive(Args)]
struct DesktopArgs {
    /// The desktops' logs and browser profiles (default: <data-dir>/desktops).
    #[arg(long)]
    desktop_root: Option<PathBuf>,
    /// Where the desktops' VNC servers listen.
    #[arg(long, default_value = "127.0.0.1")]
    desktop_vnc_listen: String,
    /// The browser (Chromium or one taking its flags).
    #[arg(long, default_value = "chromium")]
    desktop_browser: String,
}

/// `--driver libvirt` only (the build needs `--features libvirt`).
#[derive(Args)]
struct LibvirtArgs {
    /// libvirt connection URI (`test:///default` runs nothing: libvirt's test driver).
    #[arg(long, default_value = "qemu:///system")]
    libvirt_uri: String,
    /// Templates: `<dir>/<template>/disk.qcow2` (or disk.raw), optional kernel, initrd, cmdline.
    #[arg(long, default_value = "/var/lib/guaca-hive/templates")]
    templates_dir: PathBuf,
    /// VM overlays and serial sockets (default: <data-dir>/vms).
    #[arg(long)]
    vm_dir: Option<PathBuf>,
    /// Where VNC displays listen.
    #[arg(long, default_value = "127.0.0.1")]
    vnc_listen: String,
    /// The first of the 2000 ports VNC displays take.
    #[arg(long, default_value_t = 5900)]
    vnc_first_port: u16,
    /// How other nodes' libvirtd reach this node's, for live moves to this node
    /// (e.g. qemu+tls://node-b.example/system; default: this node takes no live moves).
    #[arg(long)]
    libvirt_peer_uri: Option<String>,
    /// Where live moves to this node send memory and disk (e.g. tcp://10.0.0.2; default: libvirt's).
    #[arg(long)]
    libvirt_migrate_uri: Option<String>,
    /// Accelerator: kvm or tcg (default: kvm when /dev/kvm opens read-write).
    #[arg(long, value_parser = ["kvm", "tcg"])]
    accel: Option<String>,
    /// The VMs' NIC: none, user or bridge:<name>.
    #[arg(long, default_value = "none")]
    network: guaca_hive::drivers::domain_xml::NetworkMode,
    /// Fixed addresses through dnsmasq, e.g. 10.77.0.10-10.77.0.250 (default: none).
    #[arg(long)]
    dnsmasq_range: Option<String>,
    /// dnsmasq's --dhcp-hostsfile (default: <data-dir>/dnsmasq.hosts).
    #[arg(long)]
    dnsmasq_hosts_file: Option<PathBuf>,
    /// dnsmasq's --addn-hosts, which makes the VMs' names resolve (default: <data-dir>/dnsmasq.addn-hosts).
    #[arg(long)]
    dnsmasq_addn_hosts: Option<PathBuf>,
    /// dnsmasq's --pid-file: it gets SIGHUP after every change.
    #[arg(long)]
    dnsmasq_pid_file: Option<PathBuf>,
    /// The guests' SSH private key (unencrypted, OpenSSH format): turns on the command channel
    /// (scripts, prepare, readiness by `true` over SSH). Needs --dnsmasq-range and one of
    /// --ssh-fingerprint, --ssh-known-hosts or --ssh-accept-any-host-key.
    #[arg(long)]
    ssh_key: Option<PathBuf>,
    /// The user the command channel logs in as.
    #[arg(long, default_value = "root")]
    ssh_user: String,
    /// The port the guests' SSH server listens on.
    #[arg(long, default_value_t = 22)]
    ssh_port: u16,
    /// Trust guests presenting the host key with this fingerprint (`SHA256:…`, as `ssh-keygen -l`
    /// prints it): for guests cloned from one template.
    #[arg(long, conflicts_with_all = ["ssh_known_hosts", "ssh_accept_any_host_key"])]
    ssh_fingerprint: Option<String>,
    /// Trust guests whose host keys are listed in this OpenSSH known_hosts file.
    #[arg(long, conflicts_with = "ssh_accept_any_host_key")]
    ssh_known_hosts: Option<PathBuf>,
    /// INSECURE: trust any guest host key. Only for disposable test guests.
    #[arg(long)]
    ssh_accept_any_host_key: bool,
    /// Run in a VM through the command channel before it is handed out; `{home_page}` and
    /// `{profile}` are replaced by the shell-quoted values.
    #[arg(long, requires = "ssh_key")]
    prepare_command: Option<String>,
}

/// The command channel of `--ssh-key`, if given.
#[cfg(feature = "libvirt")]
fn ssh_channel(a: &LibvirtArgs) -> anyhow::Result<Option<std::sync::Arc<dyn guaca_hive::guest::CommandChannel>>> {
    use guaca_hive::guest::ssh::{HostKeyPolicy, SshChannel, SshConfig};
    let Some(key) = &a.ssh_key else {
        anyhow::ensure!(
            a.ssh_fingerprint.is_none() && a.ssh_known_hosts.is_none() && !a.ssh_accept_any_host_key,
            "--ssh-fingerprint, --ssh-known-hosts and --ssh-accept-any-host-key need --ssh-key"
        );
        return Ok(None);
    };
    let host_key = match (&a.ssh_fingerprint, &a.ssh_known_hosts, a.ssh_accept_any_host_key) {
        (Some(fp), None, false) => HostKeyPolicy::Fingerprint(fp.clone()),
        (None, Some(path), false) => HostKeyPolicy::KnownHosts(path.clone()),
        (None, None, true) => HostKeyPolicy::AcceptAny,
        _ => anyhow::bail!("--ssh-key needs one of --ssh-fingerprint, --ssh-known-hosts or --ssh-accept-any-host-key"),
    };
    let cfg = SshConfig { user: a.ssh_user.clone(), port: a.ssh_port, private_key: key.clone(), host_key, ..SshConfig::default() };
    Ok(Some(std::sync::Arc::new(SshChannel::new(cfg)?)))
}

#[cfg(feature = "libvirt")]
async fn libvirt_driver(a: LibvirtArgs, data_dir: &Path) -> anyhow::Result<std::sync::Arc<dyn guaca_hive::drivers::Hypervisor>> {
    use guaca_hive::drivers::addresses::AddressConfig;
    use guaca_hive::drivers::domain_xml::DomainType;
    use guaca_hive::drivers::libvirt::{LibvirtConfig, LibvirtHypervisor};
    let channel = ssh_channel(&a)?;
    let addresses = match &a.dnsmasq_range {
        None => None,
        Some(range) => {
            let (start, end) = range.split_once('-').context("--dnsmasq-range: expected <first-ip>-<last-ip>")?;
            Some(AddressConfig {
                range_start: start.trim().parse().context("--dnsmasq-range: first IP")?,
                range_end: end.trim().parse().context("--dnsmasq-range: last IP")?,
                hosts_file: a.dnsmasq_hosts_file.unwrap_or_else(|| data_dir.join("dnsmasq.hosts")),
                addn_hosts_file: Some(a.dnsmasq_addn_hosts.unwrap_or_else(|| data_dir.join("dnsmasq.addn-hosts"))),
                pid_file: a.dnsmasq_pid_file,
                lease: "infinite".into(),
            })
        }
    };
    let cfg = LibvirtConfig {
        uri: a.libvirt_uri,
        templates_dir: a.templates_dir,
        vm_dir: a.vm_dir.unwrap_or_else(|| data_dir.join("vms")),
        vnc_listen: a.vnc_listen,
        vnc_first_port: a.vnc_first_port,
        network: a.network,
        domain_type: a.accel.map(|x| if x == "kvm" { DomainType::Kvm } else { DomainType::Qemu }),
        addresses,
        prepare_command: a.prepare_command,
        peer_uri: a.libvirt_peer_uri,
        migrate_uri: a.libvirt_migrate_uri,
        ..LibvirtConfig::default()
    };
    let hv = tokio::task::spawn_blocking(move || LibvirtHypervisor::open(cfg, channel)).await??;
    Ok(std::sync::Arc::new(hv))
}

#[cfg(not(feature = "libvirt"))]
async fn libvirt_driver(_: LibvirtArgs, _: &Path) -> anyhow::Result<std::sync::Arc<dyn guaca_hive::drivers::Hypervisor>> {
    anyhow::bail!("this hive was built without the libvirt driver: rebuild with `cargo build --features libvirt` (needs libvirt-dev)")
}

async fn node(a: NodeArgs) -> anyhow::Result<()> {
    use guaca_hive::agent::{self, AgentConfig, proto::Offer};
    use guaca_hive::drivers::sim::{SimHypervisor, SimTimings};
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
    let hv: std::sync::Arc<dyn guaca_hive::drivers::Hypervisor> = match a.driver.as_str() {
        "sim" => {
            tracing::warn!("driver sim: a simulated hypervisor, not real VMs");
            std::sync::Arc::new(SimHypervisor::new("agent", 200, SimTimings::default(), Some(a.data_dir.join("sim-state.json"))))
        }
        "libvirt" => libvirt_driver(a.libvirt, &a.data_dir).await?,
        "desktop" => {
            use guaca_hive::drivers::desktop::{DesktopConfig, DesktopHypervisor};
            let cfg = DesktopConfig {
                root: a.desktop.desktop_root.unwrap_or_else(|| a.data_dir.join("desktops")),
                vnc_listen: a.desktop.desktop_vnc_listen,
                browser: a.desktop.desktop_browser,
                ..DesktopConfig::default()
            };
            std::sync::Arc::new(DesktopHypervisor::new(cfg).await?)
        }
        other => anyhow::bail!("unknown driver {other:?}: use sim, libvirt or desktop"),
    };
    let (cpus, ram, disk_free) = guaca_hive::agent::host::HostSampler::new(&a.data_dir).capacity();
    let offer =
        Offer { cores: a.cores.unwrap_or(cpus), ram_mb: a.ram_mb.unwrap_or(ram * 3 / 4), disk_mb: a.disk_mb.unwrap_or(disk_free / 2) };
    let name = a
        .name
        .clone()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "node".into());
    let mut hives = a.hive.into_iter().map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
    let primary = hives.next().context("--hive: give at least one URL")?;
    let cfg = AgentConfig {
        hive: primary,
        also: hives.collect(),
        token: a.token,
        name,
        offer,
        addresses: vec![a.address],
        data_dir: a.data_dir,
        backoff_max: std::time::Duration::from_secs(30),
        peer_listen: a.peer_listen,
        stock: a.stock,
        behind_nat: a.behind_nat,
        caps: guaca_hive::agent::images::Caps { up: a.upload_mbps.map(|m| m * 1_000_000), down: a.download_mbps.map(|m| m * 1_000_000) },
    };
    tokio::select! {
        r = agent::run(cfg, hv) => Ok(r?),
        _ = shutdown_signal() => {
            tracing::info!("agent stopping");
            Ok(())
        }
    }
}

#[derive(Args)]
struct Common {
    /// TOML config file (defaults → file → HIVE_… environment → these flags).
    #[arg(long, env = "HIVE_CONFIG")]
    config: Option<PathBuf>,
    /// Address for the HTTP API (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Where the store and the node state live (default ./hive-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    common: Common,
    /// Number of simulated nodes (default 3, each 8 cores and 16 GiB).
    #[arg(long)]
    sim_nodes: Option<u32>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
}

fn load(common: &Common) -> anyhow::Result<HiveConfig> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut cfg = HiveConfig::load(common.config.as_deref(), &env)?;
    if let Some(l) = common.listen {
        cfg.listen = l;
    }
    if let Some(d) = &common.data_dir {
        cfg.data_dir = d.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The admin token of `hive up`: the configured one, else the one saved in the data
/// directory, else a new random one saved there (mode 0600).
fn admin_token(data_dir: &Path) -> anyhow::Result<SecretString> {
    let path = data_dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(SecretString::from(t.trim().to_string()));
        }
    }
    use rand::Rng;
    let token: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(40).map(char::from).collect();
    std::fs::create_dir_all(data_dir)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(&path).with_context(|| format!("writing {}", path.display()))?, token.as_bytes())?;
    Ok(SecretString::from(token))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (cfg, up) = match cli.cmd {
        Cmd::Ctl(a) => std::process::exit(guaca_hive::ctl::main(a).await),
        Cmd::Node(a) => return node(*a).await,
        Cmd::Up(a) => {
            let mut cfg = load(&a.common)?;
            if let Some(n) = a.sim_nodes {
                cfg.sim.nodes = n;
            }
            if cfg.admin_token.is_none() {
                cfg.admin_token = Some(admin_token(&cfg.data_dir)?);
            }
            (cfg, true)
        }
        Cmd::Serve(a) => {
            let mut cfg = load(&a.common)?;
            cfg.sim.nodes = 0;
            if cfg.admin_token.is_none() {
                tracing::warn!("no admin_token configured: admin routes will answer 401");
            }
            (cfg, false)
        }
    };
    run(cfg, up).await
}

async fn run(mut cfg: HiveConfig, up: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    // Port 0 picks a port at bind time: other instances must be told the real one. Bound to
    // every interface, the host name is the best guess at how the others reach this one.
    cfg.coord.advertise_url.get_or_insert_with(|| match (addr.ip().is_unspecified(), sysinfo::System::host_name()) {
        (true, Some(host)) => format!("http://{host}:{}", addr.port()),
        _ => format!("http://{addr}"),
    });
    let hive = Hive::start(cfg).await?;
    let base = format!("http://{addr}");
    if up {
        println!("guaca-hive is up with {} simulated node(s) (a simulator, not real VMs).", hive.config().sim.nodes);
        println!("  monitor (browser):  {base}/");
        println!("  vmcloud API:        curl -X POST {base}/prepare-batch/1/https%3A%2F%2Fexample.org");
        println!("  JSON API:           curl {base}/api/v1/pools");
        if let Some(t) = hive.admin_token() {
            println!("  admin token:        {}  (saved in {})", t.expose_secret(), hive.config().data_dir.join("admin-token").display());
        }
    }
    println!("listening on {base}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(guaca_hive::http::serve(hive.clone(), listener, async move {
        let _ = stop_rx.await;
    }));
    let failed = tokio::select! {
        _ = shutdown_signal() => false,
        _ = hive.stopped() => true,
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    // Open keep-alive or SSE connections would hold the server; give them a moment.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    hive.stop().await;
    if failed {
        anyhow::bail!("the actor tree stopped after repeated failures; see the log above");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
