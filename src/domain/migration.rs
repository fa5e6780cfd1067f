//! Migration of a VM from a source endpoint to a destination, as a pure state machine
//! (specs/migration.md): `Migration::apply(input, now)` checks a scheduler or worker report
//! against the current state and answers what the shell must do next. Guarantees: a finished
//! migration (Completed, Error, Cancelled) never changes again; only the current worker's
//! reports count; overall progress never decreases within one attempt; at most `MAX_ATTEMPTS`
//! attempts run, each on a node not tried before; a refused input changes nothing.
//! Endpoints and resources live in `endpoint.rs`, the choice of worker in `schedule.rs`.

mod endpoint;
mod schedule;

use serde::{Deserialize, Serialize};

use super::{Millis, NodeId};

pub use endpoint::{
    DRIVERS, Discovered, Endpoint, EndpointState, Resource, ResourceDiff, ResourceKind, Role, known_driver, reconcile, redact_params,
};
pub use schedule::{NoWorker, WorkerCandidate, choose_worker};

/// The first attempt and up to three more on other nodes after a failure (issue 7).
pub const MAX_ATTEMPTS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Initiating,
    Inprogress,
    Completed,
    Error,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [Status::Initiating, Status::Inprogress, Status::Completed, Status::Error, Status::Cancelled];

    /// The wire and column name (the serde name).
    pub fn name(self) -> &'static str {
        match self {
            Status::Initiating => "Initiating",
            Status::Inprogress => "Inprogress",
            Status::Completed => "Completed",
            Status::Error => "Error",
            Status::Cancelled => "Cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.name() == s)
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Status::Completed | Status::Error | Status::Cancelled)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a migration is, in the spec's order. Serialized as the spec's words; the issue's
/// spelling without "(s)" is accepted on input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Event {
    Scheduling,
    #[serde(rename = "Connecting to source")]
    ConnectingToSource,
    #[serde(rename = "Fetching disk(s)", alias = "Fetching disks")]
    FetchingDisks,
    #[serde(rename = "Converting disk(s)", alias = "Converting disks")]
    ConvertingDisks,
    #[serde(rename = "Uploading to destination")]
    UploadingToDestination,
    #[serde(rename = "Booting instance")]
    BootingInstance,
    #[serde(rename = "done")]
    Done,
}

impl Event {
    pub const ALL: [Event; 7] = [
        Event::Scheduling,
        Event::ConnectingToSource,
        Event::FetchingDisks,
        Event::ConvertingDisks,
        Event::UploadingToDestination,
        Event::BootingInstance,
        Event::Done,
    ];

    /// What users read (the serde name).
    pub fn label(self) -> &'static str {
        match self {
            Event::Scheduling => "Scheduling",
            Event::ConnectingToSource => "Connecting to source",
            Event::FetchingDisks => "Fetching disk(s)",
            Event::ConvertingDisks => "Converting disk(s)",
            Event::UploadingToDestination => "Uploading to destination",
            Event::BootingInstance => "Booting instance",
            Event::Done => "done",
        }
    }

    /// A short stable name for database columns, independent of the wording users read.
    pub fn code(self) -> &'static str {
        match self {
            Event::Scheduling => "scheduling",
            Event::ConnectingToSource => "connecting",
            Event::FetchingDisks => "fetching",
            Event::ConvertingDisks => "converting",
            Event::UploadingToDestination => "uploading",
            Event::BootingInstance => "booting",
            Event::Done => "done",
        }
    }

    pub fn from_code(s: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.code() == s)
    }

    /// Steps a worker reports; Scheduling and Done belong to the hive.
    pub fn is_worker_step(self) -> bool {
        !matches!(self, Event::Scheduling | Event::Done)
    }

    /// The share of overall progress (percent, from..to) this step covers. Conversion and the
    /// disk copy dominate a migration's time, so they get most of the bar.
    pub fn span(self) -> (u8, u8) {
        match self {
            Event::Scheduling => (0, 0),
            Event::ConnectingToSource => (0, 5),
            Event::FetchingDisks => (5, 35),
            Event::ConvertingDisks => (35, 75),
            Event::UploadingToDestination => (75, 90),
            Event::BootingInstance => (90, 100),
            Event::Done => (100, 100),
        }
    }

    /// Overall progress when this step is `step_progress` percent done (clamped to 100).
    pub fn overall(self, step_progress: u8) -> u8 {
        let (lo, hi) = self.span();
        let step = u32::from(step_progress.min(100));
        lo + ((u32::from(hi - lo) * step) / 100) as u8
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One failed attempt: where it ran and why it stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub node: NodeId,
    pub error: String,
    pub at: Millis,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub resource_id: u64,
    pub destination_id: u64,
    pub status: Status,
    pub event: Event,
    /// Overall percent, 0..=100.
    pub progress: u8,
    /// The cause of an Error.
    pub error: Option<String>,
    /// The node running the current attempt (kept after the end, to say who ran it).
    pub worker: Option<NodeId>,
    /// Failed attempts, oldest first.
    pub attempts: Vec<Attempt>,
    /// What the destination now holds (image name, instance), once Completed.
    pub result: Option<serde_json::Value>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// What the scheduler and the workers report.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationInput {
    /// The scheduler gave the (next) attempt to `node`.
    Scheduled {
        node: NodeId,
    },
    /// No node can take the attempt (`choose_worker` said why): the migration ends in Error.
    Unschedulable {
        reason: String,
    },
    /// The worker is `step_progress` percent through `event`.
    Step {
        node: NodeId,
        event: Event,
        step_progress: u8,
    },
    /// The worker stopped by failing (`retryable`: another node may succeed, e.g. its scratch
    /// space filled up; not retryable: e.g. a corrupt source, which fails everywhere).
    StepFailed {
        node: NodeId,
        error: String,
        retryable: bool,
    },
    /// The worker was lost (disconnected, died, stopped answering): retry elsewhere.
    WorkerFailed {
        node: NodeId,
        error: String,
    },
    Completed {
        node: NodeId,
        result: serde_json::Value,
    },
    /// A user asked to stop.
    Cancel,
}

impl MigrationInput {
    fn verb(&self) -> &'static str {
        match self {
            MigrationInput::Scheduled { .. } => "scheduling",
            MigrationInput::Unschedulable { .. } => "giving up scheduling",
            MigrationInput::Step { .. } => "a step report",
            MigrationInput::StepFailed { .. } => "a step failure",
            MigrationInput::WorkerFailed { .. } => "a worker failure",
            MigrationInput::Completed { .. } => "completion",
            MigrationInput::Cancel => "cancel",
        }
    }
}

/// Work for the shell, after it has persisted the migration as `apply` left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationEffect {
    /// Choose a worker, skipping `tried`, and report `Scheduled` or `Unschedulable`.
    Schedule { tried: Vec<NodeId> },
    /// Start the job on `node`.
    Start { node: NodeId },
    /// Tell `node` to stop the job and remove its temporary files (it may already be gone).
    Stop { node: NodeId },
    /// The resource has been migrated: set its `migrated` flag.
    MarkMigrated { resource_id: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MigrationRuleError {
    #[error("migration {id} is {status}; it does not change any more")]
    Finished { id: u64, status: Status },
    #[error("migration {id} is {status} ({event}); {asked} is not possible now")]
    BadTransition { id: u64, status: Status, event: Event, asked: &'static str },
    #[error("node {node} is not the worker of migration {id} (its worker is {})", worker.map_or("none".to_string(), |w| format!("node {w}")))]
    NotWorker { id: u64, node: NodeId, worker: Option<NodeId> },
    #[error("migration {id} already failed on node {node}; a retry runs on another node")]
    AlreadyTried { id: u64, node: NodeId },
    #[error("migration {id} is at {from:?}; a worker cannot go back to {to:?}")]
    StepBackwards { id: u64, from: Event, to: Event },
    #[error("{event:?} is not a step a worker reports")]
    NotAStep { event: Event },
    #[error("migration {id} is {status}; only a finished migration (Completed, Error, Cancelled) can be deleted")]
    NotFinished { id: u64, status: Status },
}

impl Migration {
    /// A new migration, waiting for a worker. Its `id` is given by the store.
    pub fn new(name: String, description: String, resource_id: u64, destination_id: u64, now: Millis) -> Migration {
        Migration {
            id: 0,
            name,
            description,
            resource_id,
            destination_id,
            status: Status::Initiating,
            event: Event::Scheduling,
            progress: 0,
            error: None,
            worker: None,
            attempts: Vec::new(),
            result: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// The first thing the shell does with a new migration.
    pub fn start_effects(&self) -> Vec<MigrationEffect> {
        if self.waiting_for_worker() { vec![MigrationEffect::Schedule { tried: self.tried_nodes() }] } else { Vec::new() }
    }

    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }

    /// Nodes an attempt already failed on, oldest first.
    pub fn tried_nodes(&self) -> Vec<NodeId> {
        self.attempts.iter().map(|a| a.node).collect()
    }

    /// Between attempts (or before the first): no worker runs it.
    pub fn waiting_for_worker(&self) -> bool {
        matches!(self.status, Status::Initiating | Status::Inprogress) && self.event == Event::Scheduling
    }

    /// Only a finished migration may be deleted: a running one would leave its worker orphaned.
    pub fn check_delete(&self) -> Result<(), MigrationRuleError> {
        if self.is_finished() { Ok(()) } else { Err(MigrationRuleError::NotFinished { id: self.id, status: self.status }) }
    }

    /// Apply `input` at `now`. On success the migration changed (persist it before carrying out
    /// the effects); on a refusal nothing changed.
    pub fn apply(&mut self, input: MigrationInput, now: Millis) -> Result<Vec<MigrationEffect>, MigrationRuleError> {
        if self.is_finished() {
            return Err(MigrationRuleError::Finished { id: self.id, status: self.status });
        }
        let asked = input.verb();
        let effects = match input {
            MigrationInput::Scheduled { node } => {
                self.check_waiting(asked)?;
                if self.attempts.iter().any(|a| a.node == node) {
                    return Err(MigrationRuleError::AlreadyTried { id: self.id, node });
                }
                self.status = Status::Inprogress;
                self.event = Event::ConnectingToSource;
                self.progress = 0;
                self.worker = Some(node);
                vec![MigrationEffect::Start { node }]
            }
            MigrationInput::Unschedulable { reason } => {
                self.check_waiting(asked)?;
                let cause = match self.attempts.last() {
                    Some(last) => format!("{reason}; the last attempt failed on node {}: {}", last.node, last.error),
                    None => reason,
                };
                self.fail(cause);
                Vec::new()
            }
            MigrationInput::Step { node, event, step_progress } => {
                self.check_worker(node, asked)?;
                if !event.is_worker_step() {
                    return Err(MigrationRuleError::NotAStep { event });
                }
                if event < self.event {
                    return Err(MigrationRuleError::StepBackwards { id: self.id, from: self.event, to: event });
                }
                self.event = event;
                self.progress = self.progress.max(event.overall(step_progress));
                Vec::new()
            }
            MigrationInput::StepFailed { node, error, retryable } => {
                self.check_worker(node, asked)?;
                // The worker itself reported: it has stopped and cleaned up already.
                self.failed_attempt(node, error, retryable, now, Vec::new())
            }
            MigrationInput::WorkerFailed { node, error } => {
                self.check_worker(node, asked)?;
                // The worker may still be running somewhere we cannot hear from.
                self.failed_attempt(node, error, true, now, vec![MigrationEffect::Stop { node }])
            }
            MigrationInput::Completed { node, result } => {
                self.check_worker(node, asked)?;
                self.status = Status::Completed;
                self.event = Event::Done;
                self.progress = 100;
                self.error = None;
                self.result = Some(result);
                vec![MigrationEffect::MarkMigrated { resource_id: self.resource_id }]
            }
            MigrationInput::Cancel => {
                self.status = Status::Cancelled;
                // Between attempts no worker runs it (`worker` is cleared on a retry).
                self.worker.map(|node| MigrationEffect::Stop { node }).into_iter().collect()
            }
        };
        self.updated_at = now;
        Ok(effects)
    }

    fn check_waiting(&self, asked: &'static str) -> Result<(), MigrationRuleError> {
        if self.waiting_for_worker() { Ok(()) } else { Err(self.bad(asked)) }
    }

    /// A worker's report counts only while it runs the current attempt: reports from an
    /// earlier attempt's node arrive late and must not move the new one.
    fn check_worker(&self, node: NodeId, asked: &'static str) -> Result<(), MigrationRuleError> {
        if self.status != Status::Inprogress || self.event == Event::Scheduling {
            return Err(self.bad(asked));
        }
        if self.worker != Some(node) {
            return Err(MigrationRuleError::NotWorker { id: self.id, node, worker: self.worker });
        }
        Ok(())
    }

    fn failed_attempt(
        &mut self,
        node: NodeId,
        error: String,
        retryable: bool,
        now: Millis,
        mut effects: Vec<MigrationEffect>,
    ) -> Vec<MigrationEffect> {
        self.attempts.push(Attempt { node, error: error.clone(), at: now });
        if retryable && self.attempts.len() < MAX_ATTEMPTS {
            self.event = Event::Scheduling;
            self.progress = 0;
            self.worker = None;
            effects.push(MigrationEffect::Schedule { tried: self.tried_nodes() });
        } else {
            self.fail(error);
        }
        effects
    }

    fn fail(&mut self, cause: String) {
        self.status = Status::Error;
        self.error = Some(cause);
    }

    fn bad(&self, asked: &'static str) -> MigrationRuleError {
        MigrationRuleError::BadTransition { id: self.id, status: self.status, event: self.event, asked }
    }
}

#[cfg(test)]
mod tests;
