//! `NodeActor`: one per node, supervised by the registry. It runs the active health check (a
//! round trip to the node's hypervisor: `list`) every heartbeat interval in a spawned task and
//! reports the result; the registry folds it into the node's health.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::{NodeSpec, RegistryMsg};
use crate::domain::NodeId;
use crate::drivers::Hypervisor;

pub enum NodeMsg {
    Check,
    Checked(bool),
}

pub struct NodeActor;

pub struct NodeArgs {
    id: NodeId,
    driver: Arc<dyn Hypervisor>,
    registry: ActorRef<RegistryMsg>,
    interval: Duration,
}

pub struct NodeActorState {
    args: NodeArgs,
    checking: bool,
}

pub(super) async fn spawn(
    me: &ActorRef<RegistryMsg>,
    spec: &NodeSpec,
    interval: Duration,
) -> Result<ActorRef<NodeMsg>, ActorProcessingErr> {
    let args = NodeArgs { id: spec.id, driver: spec.driver.clone(), registry: me.clone(), interval };
    let (actor, _) = Actor::spawn_linked(None, NodeActor, args, me.get_cell()).await?;
    Ok(actor)
}

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeActorState;
    type Arguments = NodeArgs;

    async fn pre_start(&self, me: ActorRef<NodeMsg>, args: NodeArgs) -> Result<NodeActorState, ActorProcessingErr> {
        me.send_interval(args.interval, || NodeMsg::Check);
        Ok(NodeActorState { args, checking: false })
    }

    async fn handle(&self, me: ActorRef<NodeMsg>, msg: NodeMsg, st: &mut NodeActorState) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Check if !st.checking => {
                st.checking = true;
                let driver = st.args.driver.clone();
                tokio::spawn(async move {
                    let ok = driver.list().await.is_ok();
                    let _ = me.cast(NodeMsg::Checked(ok));
                });
            }
            NodeMsg::Check => {}
            NodeMsg::Checked(ok) => {
                st.checking = false;
                let _ = st.args.registry.cast(RegistryMsg::Checked(st.args.id, ok));
            }
        }
        Ok(())
    }
}
