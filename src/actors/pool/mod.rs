//! `PoolManager`: one actor per pool, the only writer of that pool's state. It feeds the pure
//! machine in `domain::pool` with API calls, driver reports and timer ticks, carries out the
//! effects (through its `SessionActor` children), and hands the changed rows to the group-commit
//! writer. A reply, and anything a client could observe, leaves only after the commit that made
//! it durable. Rules run on every event; one timer is set for the next deadline, not a tick.
//! If a commit fails, the manager stops with an error and its supervisor rebuilds it from the
//! store, so memory never runs ahead of what is durable for long.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::actors::node::{NodeRegistryHandle, VmKey};
use crate::actors::session::{SessionActor, SessionArgs, SessionMsg};
use crate::actors::{CallError, Clock, RestartLog, RestartPolicy};
mod claims;
mod effects;
mod handle;
mod hooks;
pub mod moves;
mod moves_live;
mod reports;

pub use handle::PoolHandle;
pub use hooks::VmHooks;

use crate::domain::node::NodeUse;
use crate::domain::pool::{Handle, PoolInputError, PoolRules, PoolSnapshot, PoolState, Resized};
use crate::domain::vm::{Placement, Vm, VmAddress};
use crate::domain::{BatchId, HandleId, Millis, NodeId, VmId};
use crate::drivers::VmSpec;
use crate::metrics;
use crate::store::writer::Fence;
use crate::store::{Change, StoreError, StoreWriter};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Input(#[from] PoolInputError),
    #[error("no pool {0:?}")]
    NoSuchPool(String),
    #[error("pool {0:?} already exists")]
    Exists(String),
    #[error("pool {0:?} is in use: {1}")]
    Busy(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Call(#[from] CallError),
}

/// A handle and, once assigned, its VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandleView {
    pub handle: Handle,
    pub vm: Option<Vm>,
    /// When the pool ends the session on its own (`max_session_ms` after the VM was handed
    /// over), if it does.
    pub ends_at: Option<Millis>,
}

/// What a driver task learned; tagged with the operation number the rules gave it.
#[derive(Clone, Debug)]
pub enum DriverReport {
    Created {
        vm: VmId,
        op: u64,
        placement: Placement,
    },
    Booted {
        vm: VmId,
        op: u64,
        address: VmAddress,
    },
    BootFailed {
        vm: VmId,
        op: u64,
        placement: Option<Placement>,
    },
    /// `vnc_passwd`: the VNC password after the step, when the driver could tell.
    Prepared {
        vm: VmId,
        op: u64,
        ok: bool,
        vnc_passwd: Option<String>,
    },
    Cleaned {
        vm: VmId,
        op: u64,
        ok: bool,
        vnc_passwd: Option<String>,
    },
    Pinged {
        vm: VmId,
        ok: bool,
    },
    Moved {
        vm: VmId,
        op: u64,
        outcome: moves::MoveOutcome,
    },
}

pub(super) type Reply<T> = RpcReplyPort<Result<T, PoolError>>;

pub enum PoolMsg {
    SetSize {
        min: u32,
        max: u32,
        linger: u64,
        reply: Reply<Resized>,
    },
    PrepareBatch {
        size: u32,
        home_page: String,
        reply: Reply<BatchId>,
    },
    Lock {
        batch: BatchId,
        reply: Reply<HandleId>,
    },
    Release {
        handle: HandleId,
        reply: Reply<()>,
    },
    CancelBatch {
        batch: BatchId,
        reply: Reply<()>,
    },
    RenewExpire {
        handle: HandleId,
        ms: u64,
        reply: Reply<Millis>,
    },
    Shutdown {
        reply: Reply<()>,
    },
    Status {
        reply: Reply<PoolSnapshot>,
    },
    HandleStatus {
        handle: HandleId,
        reply: Reply<HandleView>,
    },
    WaitAssigned {
        handle: HandleId,
        reply: Reply<HandleView>,
    },
    Report(DriverReport),
    /// Move a VM to another node (FREE or READY: cold; OCCUPIED: live); answered once the move has begun.
    MoveVm {
        vm: VmId,
        to: NodeId,
        reply: Reply<moves::MoveView>,
    },
    MoveStatus {
        vm: VmId,
        reply: Reply<Option<moves::MoveView>>,
    },
    Tick,
    /// The node registry was restarted: reserve this pool's VMs' capacity again.
    Reclaim,
    /// A node's state changed: how this pool may use the VMs it runs there.
    NodeUse {
        node: NodeId,
        usage: NodeUse,
    },
    /// A reconnected agent listed the domains its node holds.
    DomainsReported {
        node: NodeId,
        domains: BTreeSet<String>,
    },
    PersistFailed(String),
    /// Stop without failing: see `claims::stop_for`.
    Superseded(String),
    Crash,
    CrashSession(VmId),
}

/// Everything a pool manager needs; kept by the supervisor to rebuild it after a failure.
#[derive(Clone)]
pub struct PoolArgs {
    pub handle: PoolHandle,
    pub rules: PoolRules,
    pub writer: StoreWriter,
    pub nodes: NodeRegistryHandle,
    pub vm_spec: VmSpec,
    pub ping_interval: Duration,
    pub restart: RestartPolicy,
    pub clock: Clock,
    /// Claims on VMs go through it; `lease` is the token of the pool's lease this manager runs
    /// under, the floor of the fencing epoch it takes in the store.
    pub coord: Arc<dyn crate::coord::Coordinator>,
    pub lease: u64,
    pub hooks: Option<Arc<dyn VmHooks>>,
    /// Where moves between agents pass their disks (and delete them afterwards).
    pub images: Option<crate::images::ImageRegistry>,
}

pub struct PoolManager;

pub struct PoolManagerState {
    args: PoolArgs,
    pool: PoolState,
    sessions: HashMap<VmId, ActorRef<SessionMsg>>,
    session_ids: HashMap<ActorId, VmId>,
    waiters: HashMap<HandleId, Vec<Reply<HandleView>>>,
    /// When each pending lock arrived, for the lock-to-assigned histogram.
    locked_at: HashMap<HandleId, tokio::time::Instant>,
    restarts: RestartLog,
    timer: Option<(Millis, JoinHandle<()>)>,
    /// The pool row as last written, to skip rewriting it when nothing in it changed.
    written_row: Option<Change>,
    /// Replies and notices that may leave only once the current changes are durable.
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
    /// Set by the writer when a commit of this incarnation fails: later ones are not written
    /// and their replies never sent; the supervisor rebuilds the pool from the store.
    fence: Fence,
    /// Sequence numbers of submitted commits, and the highest one known durable: a read that
    /// depends only on rows already durable is answered at once instead of queueing behind
    /// unrelated writes.
    submitted: u64,
    durable: Arc<AtomicU64>,
    /// The commit that last wrote each handle's row (created, assigned, renewed or deleted).
    handle_written: HashMap<HandleId, u64>,
    /// Rows that are not pool state (the rewards ledger), written with the next commit.
    ledger: Vec<Change>,
    /// This manager's fencing epoch: every commit carries it, and the store refuses it once a
    /// newer manager of the pool (on any instance) has taken the fence.
    epoch: u64,
    /// The coordinator's claim on each VM handed to a handle.
    claims: HashMap<VmId, crate::coord::Claim>,
    /// Set by an effect that cannot be carried out safely (no claim): the manager stops before
    /// committing the event's changes.
    stopping: Option<String>,
    /// The last move of each VM since this manager started.
    moves: HashMap<VmId, moves::MoveView>,
}

impl Actor for PoolManager {
    type Msg = PoolMsg;
    type State = PoolManagerState;
    type Arguments = PoolArgs;

    async fn pre_start(&self, me: ActorRef<PoolMsg>, args: PoolArgs) -> Result<PoolManagerState, ActorProcessingErr> {
        let name = args.handle.name().to_string();
        // The fence first: from here on a previous holder's writes are refused, so what is
        // loaded next is final.
        let epoch = args.writer.store().take_fence(&name, args.lease).await?;
        let stored = args.writer.store().load_pools().await?.into_iter().find(|p| p.name == name);
        let snap = stored.map(|p| p.snapshot).ok_or_else(|| format!("pool {name} is not in the store"))?;
        let pool = PoolState::restore(args.rules, snap, args.clock.now());
        let mut st = PoolManagerState {
            args,
            pool,
            sessions: HashMap::new(),
            session_ids: HashMap::new(),
            waiters: HashMap::new(),
            locked_at: HashMap::new(),
            restarts: RestartLog::default(),
            timer: None,
            written_row: None,
            after_commit: Vec::new(),
            fence: Fence::default(),
            submitted: 0,
            durable: Arc::default(),
            handle_written: HashMap::new(),
            ledger: Vec::new(),
            epoch,
            claims: HashMap::new(),
            stopping: None,
            moves: HashMap::new(),
        };
        claims::restore(&mut st).await?;
        // Suspect, draining and dead nodes, as the registry sees them now.
        match st.args.nodes.uses().await {
            Ok(uses) => {
                for (node, usage) in uses {
                    st.pool.set_node_use(node, usage, st.args.clock.now());
                }
            }
            Err(e) => tracing::warn!(pool = %name, error = %e, "cannot read node states"),
        }
        for h in st.pool.handles() {
            st.args.handle.events().open(h.id);
        }
        // Re-attach to every VM that exists somewhere: claim its capacity, give it a session.
        let placed: Vec<(VmId, Placement)> = st.pool.vms().filter_map(|v| Some((v.id, v.placement.clone()?))).collect();
        for (vm, p) in placed {
            if let Err(e) = st.args.nodes.claim(p.node, &key(&st.args, vm), &st.args.vm_spec).await {
                tracing::warn!(pool = %name, vm, node.id = p.node, error = %e, "cannot re-claim capacity");
            }
            spawn_session(&me, &mut st, vm, Some(p)).await?;
        }
        me.cast(PoolMsg::Tick)?;
        tracing::info!(pool = %name, vms = st.pool.vms().count(), handles = st.pool.handles().count(), "pool manager started");
        Ok(st)
    }

    async fn post_stop(&self, _me: ActorRef<PoolMsg>, st: &mut PoolManagerState) -> Result<(), ActorProcessingErr> {
        if let Some((_, t)) = st.timer.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(&self, me: ActorRef<PoolMsg>, msg: PoolMsg, st: &mut PoolManagerState) -> Result<(), ActorProcessingErr> {
        let now = st.args.clock.now();
        let pool = &mut st.pool;
        match msg {
            PoolMsg::SetSize { min, max, linger, reply } => {
                let r = pool.set_size(min, max, linger, now);
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::PrepareBatch { size, home_page, reply } => {
                let r = pool.prepare_batch(size, home_page, now);
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::Lock { batch, reply } => {
                let r = pool.lock(batch, now);
                if let Ok(h) = r {
                    metrics::lock(st.args.handle.name());
                    st.locked_at.insert(h, tokio::time::Instant::now());
                    // The handle's event window appears only once the handle is durable.
                    let events = st.args.handle.events().clone();
                    st.after_commit.push(Box::new(move || events.open(h)));
                }
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::Release { handle, reply } => {
                let r = pool.release(handle, now);
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::CancelBatch { batch, reply } => {
                let r = pool.cancel_batch(batch, now);
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::RenewExpire { handle, ms, reply } => {
                let r = pool.renew_expire(handle, ms, now);
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::Shutdown { reply } => {
                pool.shutdown(now);
                return settle(&me, st, Ok(()), reply).await;
            }
            PoolMsg::Status { reply } => {
                let snap = pool.snapshot();
                return settle(&me, st, Ok(snap), reply).await;
            }
            PoolMsg::HandleStatus { handle, reply } => {
                let r = view(pool, handle);
                // A handle's status shows its row and the VM it was assigned with, written in the
                // same commit; once that commit is durable there is nothing to wait for.
                let durable = st.durable.load(Ordering::Acquire);
                if st.handle_written.get(&handle).is_none_or(|seq| *seq <= durable) {
                    let _ = reply.send(r);
                    return Ok(());
                }
                return settle(&me, st, r, reply).await;
            }
            PoolMsg::WaitAssigned { handle, reply } => match view(pool, handle) {
                Ok(v) if v.vm.is_none() => {
                    let w = st.waiters.entry(handle).or_default();
                    w.retain(|p| !p.is_closed());
                    w.push(reply);
                }
                r => return settle(&me, st, r, reply).await,
            },
            PoolMsg::Report(r) => {
                reports::apply_report(st, r, now);
                apply(&me, st).await?;
            }
            PoolMsg::MoveVm { vm, to, reply } => {
                let r = pool.start_move(vm, to, now).map(|m| {
                    let view = moves::MoveView::started(&m, now);
                    st.moves.insert(vm, view.clone());
                    view
                });
                return settle(&me, st, r.map_err(Into::into), reply).await;
            }
            PoolMsg::MoveStatus { vm, reply } => {
                let _ = reply.send(Ok(st.moves.get(&vm).cloned()));
            }
            PoolMsg::Tick => {
                st.timer = None;
                pool.tick(now);
                apply(&me, st).await?;
            }
            PoolMsg::Reclaim => {
                let placed: Vec<(VmKey, Placement)> =
                    pool.vms().filter_map(|v| Some((key(&st.args, v.id), v.placement.clone()?))).collect();
                let (nodes, spec) = (st.args.nodes.clone(), st.args.vm_spec.clone());
                tokio::spawn(async move {
                    for (k, p) in placed {
                        if let Err(e) = nodes.claim(p.node, &k, &spec).await {
                            tracing::warn!(node.id = p.node, error = %e, "cannot re-claim capacity");
                        }
                    }
                });
            }
            PoolMsg::NodeUse { node, usage } => {
                pool.set_node_use(node, usage, now);
                apply(&me, st).await?;
            }
            PoolMsg::DomainsReported { node, domains } => {
                pool.domains_reported(node, &domains, now);
                apply(&me, st).await?;
            }
            PoolMsg::PersistFailed(why) => {
                return Err(format!("pool {} could not persist its state: {why}", st.args.handle.name()).into());
            }
            PoolMsg::Superseded(why) => {
                // Not a failure of this actor: its lease moved, or its coordinator is away. The
                // supervisor starts it again once the lease is confirmed.
                st.args.handle.slot().set_down(why.clone());
                me.stop(Some(why));
            }
            PoolMsg::Crash => panic!("injected pool manager crash ({})", st.args.handle.name()),
            PoolMsg::CrashSession(vm) => {
                if let Some(s) = st.sessions.get(&vm) {
                    let _ = s.cast(SessionMsg::Crash);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<PoolMsg>,
        evt: SupervisionEvent,
        st: &mut PoolManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(vm) = st.session_ids.remove(&cell.get_id()) {
                    if st.sessions.get(&vm).is_some_and(|s| s.get_id() == cell.get_id()) {
                        st.sessions.remove(&vm);
                    }
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(vm) = st.session_ids.remove(&cell.get_id()) else { return Ok(()) };
                st.sessions.remove(&vm);
                metrics::actor_restart("session");
                let name = st.args.handle.name().to_string();
                tracing::warn!(pool = %name, vm, error = %err, "session failed");
                if !st.restarts.allow(&format!("session-{vm}"), st.args.restart) {
                    return Err(format!("session of vm {vm} failed too often; escalating").into());
                }
                // Restart from the stored placement; an operation in flight still reports to the pool.
                if let Some(v) = st.pool.vm(vm) {
                    let placement = v.placement.clone();
                    spawn_session(&me, st, vm, placement).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn view(pool: &PoolState, handle: HandleId) -> Result<HandleView, PoolError> {
    let h = pool.handle(handle).ok_or(PoolInputError::UnknownHandle(handle))?;
    Ok(HandleView { handle: h.clone(), vm: h.vm.and_then(|v| pool.vm(v).cloned()), ends_at: pool.session_end(h) })
}

/// Carry out effects, persist, and answer `reply` with `value` once the changes are durable.
async fn settle<T: Send + 'static>(
    me: &ActorRef<PoolMsg>,
    st: &mut PoolManagerState,
    value: Result<T, PoolError>,
    reply: Reply<T>,
) -> Result<(), ActorProcessingErr> {
    st.after_commit.push(Box::new(move || {
        let _ = reply.send(value);
    }));
    apply(me, st).await
}

/// After any event: run effects, then submit the changed rows (or an empty barrier, so that a
/// read waits for earlier writes) with every pending reply as the commit's callback.
use effects::{changes, note_handles, run_effect};

async fn apply(me: &ActorRef<PoolMsg>, st: &mut PoolManagerState) -> Result<(), ActorProcessingErr> {
    let now = st.args.clock.now();
    for effect in st.pool.take_effects() {
        run_effect(me, st, effect, now).await?;
    }
    if let Some(why) = st.stopping.take() {
        // Nothing of this event is committed and no reply of it is sent: callers are told why.
        tracing::warn!(pool = %st.args.handle.name(), reason = %why, "pool manager stopping");
        st.args.handle.slot().set_down(why.clone());
        st.after_commit.clear();
        me.stop(Some(why));
        return Ok(());
    }
    let mut changes = changes(st);
    if !changes.is_empty() {
        changes.insert(0, Change::Fence { pool: st.args.handle.name().to_string(), epoch: st.epoch });
    }
    let notices = std::mem::take(&mut st.after_commit);
    if !changes.is_empty() || !notices.is_empty() {
        metrics::vms(st.args.handle.name(), st.pool.vms().map(|v| v.state));
        metrics::pool(st.args.handle.name(), st.pool.size(), st.pool.handles().map(|h| h.vm.is_some()));
        let me = me.clone();
        let handle = (!changes.is_empty()).then(|| st.args.handle.clone());
        st.submitted += 1;
        let seq = st.submitted;
        note_handles(st, &changes, seq);
        let durable = st.durable.clone();
        let slot_of = st.args.handle.clone();
        st.args.writer.submit_fenced(
            changes,
            st.fence.clone(),
            Box::new(move |r: Result<(), StoreError>| match r {
                Ok(()) => {
                    durable.fetch_max(seq, Ordering::Release);
                    notices.into_iter().for_each(|n| n());
                    if let Some(h) = handle {
                        h.bump();
                    }
                }
                Err(e) => {
                    // The failed replies are dropped: callers see an error, never an unsaved
                    // answer, and the error says why.
                    // A fenced change failed only because an earlier one did: keep that cause.
                    if e != StoreError::Fenced {
                        slot_of.slot().set_down(format!("its last change was not saved: {e}"));
                    }
                    drop(notices);
                    let _ = me.cast(match e {
                        StoreError::Superseded(_) => PoolMsg::Superseded(e.to_string()),
                        e => PoolMsg::PersistFailed(e.to_string()),
                    });
                }
            }),
        );
    }
    metrics::rule_passes(st.args.handle.name(), st.pool.passes());
    reschedule(me, st);
    Ok(())
}

fn reschedule(me: &ActorRef<PoolMsg>, st: &mut PoolManagerState) {
    let next = st.pool.next_deadline();
    if st.timer.as_ref().map(|(at, _)| *at) == next {
        return;
    }
    if let Some((_, t)) = st.timer.take() {
        t.abort();
    }
    if let Some(at) = next {
        let wait = st.args.clock.instant_at(at).saturating_duration_since(tokio::time::Instant::now());
        let me = me.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = me.cast(PoolMsg::Tick);
        });
        st.timer = Some((at, t));
    }
}

fn key(args: &PoolArgs, vm: VmId) -> VmKey {
    VmKey { pool: args.handle.name().to_string(), vm }
}

async fn spawn_session(
    me: &ActorRef<PoolMsg>,
    st: &mut PoolManagerState,
    vm: VmId,
    placement: Option<Placement>,
) -> Result<ActorRef<SessionMsg>, ActorProcessingErr> {
    let booting = st.args.rules.timeouts.booting;
    let args = SessionArgs {
        vm,
        pool: st.args.handle.clone(),
        nodes: st.args.nodes.clone(),
        spec: st.args.vm_spec.clone(),
        placement,
        ping_interval: st.args.ping_interval,
        boot_timeout: Duration::from_millis(booting),
    };
    let (session, _) = Actor::spawn_linked(None, SessionActor, args, me.get_cell()).await?;
    st.session_ids.insert(session.get_id(), vm);
    st.sessions.insert(vm, session.clone());
    Ok(session)
}
