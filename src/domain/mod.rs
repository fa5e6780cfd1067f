//! Plain types and pure state machines. Nothing here performs I/O, reads a clock or touches an
//! actor: time comes in as an argument (`Millis` since the Unix epoch) and work to be done goes
//! out as effects. This is what makes the pool rules testable in microseconds and by proptest.

pub mod lifecycle;
pub mod migration;
pub mod node;
pub mod placement;
pub mod pool;
pub mod vm;

/// Milliseconds since the Unix epoch, as read by the caller's clock.
pub type Millis = u64;
pub type VmId = u64;
pub type BatchId = u64;
pub type HandleId = u64;
pub type NodeId = u64;
