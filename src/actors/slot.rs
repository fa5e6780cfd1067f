//! `Slot<M>`: the current `ActorRef` of a supervised actor, swapped by its supervisor on
//! restart. Handles call through a slot, so a restart is invisible to callers except as a short
//! wait; a call to an actor that stays dead ends in `CallError::Unavailable` after the timeout.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, Message, RpcReplyPort};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("{0} is not running")]
    Unavailable(&'static str),
    /// It is down and its supervisor knows why (e.g. it cannot reload from the database).
    #[error("{0} is down: {1}")]
    Down(&'static str, String),
    #[error("{0} did not answer in time")]
    Timeout(&'static str),
    /// The actor took the message and then died before answering: the request may or may
    /// not have taken effect, so it is not retried.
    #[error("{0} failed while handling the request")]
    Failed(&'static str),
}

pub struct Slot<M: Message> {
    what: &'static str,
    tx: watch::Sender<Option<ActorRef<M>>>,
    /// Why the actor is down, while its supervisor keeps trying to start it.
    down: parking_lot::Mutex<Option<String>>,
}

impl<M: Message> Slot<M> {
    pub fn new(what: &'static str) -> Slot<M> {
        Slot { what, tx: watch::channel(None).0, down: parking_lot::Mutex::new(None) }
    }

    pub fn set(&self, actor: Option<ActorRef<M>>) {
        if actor.is_some() {
            *self.down.lock() = None;
        }
        self.tx.send_replace(actor);
    }

    /// Record why the actor could not be started; until a new actor is set, callers that find
    /// no live actor are told this at once.
    pub fn set_down(&self, why: impl Into<String>) {
        *self.down.lock() = Some(why.into());
    }

    /// A new actor is on its way (a pool taken over): callers wait for it, up to their timeout,
    /// instead of being told an earlier reason at once.
    pub fn clear_down(&self) {
        *self.down.lock() = None;
    }

    fn unavailable(&self) -> CallError {
        match self.down.lock().clone() {
            Some(why) => CallError::Down(self.what, why),
            None => CallError::Unavailable(self.what),
        }
    }

    pub fn get(&self) -> Option<ActorRef<M>> {
        self.tx.borrow().clone()
    }

    /// Wait (up to `deadline`) for a live actor.
    async fn live(&self, deadline: Instant) -> Result<ActorRef<M>, CallError> {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(a) = rx.borrow_and_update().clone() {
                if a.get_status() == ractor::ActorStatus::Running || a.get_status() == ractor::ActorStatus::Starting {
                    return Ok(a);
                }
            }
            // Its supervisor could not start it and said why: answer at once, not at the
            // deadline (a restart that merely takes a moment sets no reason).
            if self.down.lock().is_some() {
                return Err(self.unavailable());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(self.unavailable()),
            }
        }
    }

    /// Send a request and wait for the reply. A message that could not be delivered (the actor
    /// is restarting) is retried until `timeout`; one that was delivered is never sent twice.
    pub async fn call<T, F>(&self, build: F, timeout: Duration) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: Fn(RpcReplyPort<T>) -> M,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let actor = self.live(deadline).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            match actor.call(&build, Some(left)).await {
                Ok(CallResult::Success(v)) => return Ok(v),
                Ok(CallResult::Timeout) => return Err(CallError::Timeout(self.what)),
                Ok(CallResult::SenderError) => {
                    return Err(match self.down.lock().clone() {
                        Some(why) => CallError::Down(self.what, why),
                        None => CallError::Failed(self.what),
                    });
                }
                Err(_) => {
                    // Not delivered: wait for the supervisor to put a new actor in the slot.
                    let mut rx = self.tx.subscribe();
                    let same = rx.borrow_and_update().as_ref().is_some_and(|a| a.get_id() == actor.get_id());
                    if same && tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                        return Err(self.unavailable());
                    }
                }
            }
        }
    }

    /// Fire and forget. Returns false if there is no live actor to take it.
    pub fn cast(&self, msg: M) -> bool {
        match self.get() {
            Some(a) => a.cast(msg).is_ok(),
            None => false,
        }
    }
}
