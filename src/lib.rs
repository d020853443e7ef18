//! mongo-replicator keeps several independent MongoDB deployments ("followers") identical to
//! one source, for the configured collections, through change streams.
//!
//! Modules, in the order data flows through them:
//! - [`config`]: the TOML config and its validation;
//! - [`uri`]: connection strings that keep their secrets, and redaction of any text;
//! - [`source`]: connecting, and the facts about the source we depend on (replica set,
//!   server time, "history lost" errors);
//! - [`lease`]: which node may write (a lease in the source, with a rising term);
//! - [`pipeline`]: one (collection, follower) pair: resume point, initial sync, streaming;
//! - [`change`]: change events to follower operations, coalescing and ordering (pure);
//! - [`follower`]: applying a batch, fenced by term, with its checkpoint in one transaction;
//! - [`checkpoint`]: resume positions and the token file;
//! - [`status`] and [`http`]: what the node reports (`/status`, `/metrics`, ...);
//! - [`check`]: the consistency check and repair;
//! - [`meta`]: collection options and index definitions: read, compared, applied;
//! - [`order`]: MongoDB's sort order of BSON values (check merges, copy resumption);
//! - [`service`]: `run`, tying it together.

pub mod change;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod control;
pub mod follower;
pub mod http;
pub mod lease;
pub mod meta;
pub mod namespace;
pub mod node;
pub mod order;
pub mod pipeline;
pub mod reader;
pub mod service;
pub mod source;
pub mod status;
pub mod uri;
