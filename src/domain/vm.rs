//! A VM as a pool sees it: its numeric vmcloud state, where it runs and how to reach it.
//! The numbers are part of the wire format (clients read them), so they never change.

use serde::{Deserialize, Serialize};

use super::{BatchId, Millis, NodeId, VmId};

/// The vmcloud VM states. `code()` is what clients read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Creating,
    Booting,
    Wait,
    Free,
    Ready,
    Occupied,
    Error,
    Killing,
}

impl VmState {
    pub const ALL: [VmState; 8] = [
        VmState::Creating,
        VmState::Booting,
        VmState::Wait,
        VmState::Free,
        VmState::Ready,
        VmState::Occupied,
        VmState::Error,
        VmState::Killing,
    ];

    pub fn code(self) -> u8 {
        match self {
            VmState::Creating => 0,
            VmState::Booting => 1,
            VmState::Wait => 2,
            VmState::Free => 3,
            VmState::Ready => 4,
            VmState::Occupied => 5,
            VmState::Error => 6,
            VmState::Killing => 7,
        }
    }

    pub fn from_code(code: u8) -> Option<VmState> {
        VmState::ALL.get(code as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Booting => "booting",
            VmState::Wait => "wait",
            VmState::Free => "free",
            VmState::Ready => "ready",
            VmState::Occupied => "occupied",
            VmState::Error => "error",
            VmState::Killing => "killing",
        }
    }

    /// States in which the VM is up and expected to answer health pings.
    pub fn is_stable(self) -> bool {
        matches!(self, VmState::Free | VmState::Ready | VmState::Occupied)
    }
}

/// How a client reaches a booted VM. Empty until the guest has checked in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAddress {
    pub ip: String,
    pub public_ip: String,
    pub vnc_port: u16,
    pub vnc_passwd: String,
}

/// Where the hypervisor put the VM: the node and the driver's name for the domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: NodeId,
    pub domain: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    pub state: VmState,
    /// When the VM entered its current state.
    pub since: Millis,
    /// Last successful contact: a state change or a health ping that answered.
    pub contact: Millis,
    pub batch: Option<BatchId>,
    pub placement: Option<Placement>,
    pub address: VmAddress,
    /// Sequence number of the operation in flight; a result carrying another number is stale.
    pub op: u64,
}

impl Vm {
    pub fn new(id: VmId, now: Millis) -> Vm {
        Vm { id, state: VmState::Creating, since: now, contact: now, batch: None, placement: None, address: VmAddress::default(), op: 0 }
    }

    pub(crate) fn enter(&mut self, state: VmState, now: Millis) {
        self.state = state;
        self.since = now;
        self.contact = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_vmcloud_numbers() {
        for (n, s) in VmState::ALL.iter().enumerate() {
            assert_eq!(s.code() as usize, n);
            assert_eq!(VmState::from_code(n as u8), Some(*s));
        }
        assert_eq!(VmState::Occupied.code(), 5);
        assert_eq!(VmState::from_code(8), None);
    }
}
