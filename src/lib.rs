//! mongo-replicator keeps several independent MongoDB deployments ("followers") identical to
//! one source, for the configured collections, through change streams.
//!
//! Modules, in the order data flows through them:
//! - [`config`] and [`namespace`]: the TOML config, its validation, and which collections it
//!   selects (names, globs, namespaces across databases);
//! - [`uri`]: connection strings that keep their secrets, and redaction of any text;
//! - [`source`]: connecting, and the facts about the source we depend on (replica set,
//!   server time, "history lost" errors);
//! - [`lease`] and [`control`]: which node may write (a lease in the source, with a rising
//!   term), and the operator's pauses, kept beside it;
//! - [`reader`]: one change stream per source database, read once;
//! - [`fanout`]: each (collection, follower) pair's bounded subscription to that stream;
//! - [`applier`]: one pair: resume point, initial copy, handover, batches;
//! - [`change`]: change events to follower operations, coalescing and ordering (pure);
//! - [`follower`]: applying a batch, fenced by term, with its checkpoint in one transaction;
//! - [`checkpoint`]: resume positions and the token file;
//! - [`meta`]: collection options and index definitions: read, compared, applied;
//! - [`status`], [`node`] and [`http`]: what the node reports (`/status`, `/metrics`, ...);
//! - [`check`]: the consistency check and repair;
//! - [`order`]: MongoDB's sort order of BSON values (check merges, copy resumption);
//! - [`service`]: `run`, tying it together; [`logging`]: where its log goes.

pub mod applier;
pub mod change;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod control;
pub mod fanout;
pub mod follower;
pub mod http;
pub mod lease;
pub mod logging;
pub mod meta;
pub mod namespace;
pub mod node;
pub mod order;
pub mod reader;
pub mod service;
pub mod source;
pub mod status;
pub mod uri;
