//! What a running node shares between its service tasks and its HTTP handlers.

use std::sync::Arc;

use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::follower::Follower;
use crate::status::NodeStatus;

/// Shared by the service's tasks and the HTTP handlers.
pub struct Node {
    pub config: Arc<Config>,
    pub status: Arc<NodeStatus>,
    pub source: mongodb::Client,
    pub followers: Vec<Arc<Follower>>,
    pub store: CheckpointStore,
}
