//! `VmHooks`: what outside the pool follows a VM's life with a user (today: the connections
//! Guacamole's REST mode keeps per VM). The manager calls them from its handler, so each must
//! return at once and do its work elsewhere, in order; a failing hook never fails the pool.

use crate::domain::VmId;
use crate::domain::vm::VmAddress;

pub trait VmHooks: Send + Sync {
    /// The VM was prepared for a batch (a user can now lock it) and is reached at `address`.
    fn prepared(&self, pool: &str, vm: VmId, address: &VmAddress);
    /// The user's hold on the VM ended (released, expired or cut at its longest session).
    fn released(&self, pool: &str, vm: VmId);
    /// The VM is being cleaned for its next user, or killed.
    fn cleaned(&self, pool: &str, vm: VmId);
}
