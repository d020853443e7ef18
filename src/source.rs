//! Connecting to deployments, and the source-side facts the replicator depends on.

use std::time::Duration;

use mongodb::bson::{doc, DateTime};
use mongodb::options::ClientOptions;
use mongodb::Client;

use crate::config::{bounded_message, redact, Uri};

/// How long an operation waits for a reachable server before it fails.
pub const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for `uri`; `what` names the deployment in errors ("source", "follower node-2").
/// The client connects lazily, so this fails only on a malformed URI.
pub async fn client(uri: &Uri, what: &str) -> anyhow::Result<Client> {
    let mut opts = ClientOptions::parse(uri.expose())
        .await
        .map_err(|e| anyhow::anyhow!("{what}: invalid URI {uri}: {}", redact(&e.to_string())))?;
    opts.app_name = Some("mongo-replicator".into());
    if opts.server_selection_timeout.is_none() {
        opts.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
    }
    if opts.connect_timeout.is_none() {
        opts.connect_timeout = Some(Duration::from_secs(5));
    }
    let client = Client::with_options(opts)
        .map_err(|e| anyhow::anyhow!("{what}: {}", redact(&e.to_string())))?;
    CLIENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(client.clone());
    Ok(client)
}

/// Every client this process made, so that [`shutdown_clients`] can close them.
static CLIENTS: std::sync::Mutex<Vec<Client>> = std::sync::Mutex::new(Vec::new());

/// Closes every client before the runtime ends. Without it, the driver's background tasks
/// may find their channels gone while the runtime shuts down, and panic at exit.
pub async fn shutdown_clients() {
    let clients = std::mem::take(&mut *CLIENTS.lock().unwrap_or_else(|e| e.into_inner()));
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.shutdown().immediate(true)).await;
    }
}

/// Why the source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach the source ({uri}): {reason}")]
    Unreachable { uri: String, reason: String },
    #[error("authentication to the source ({uri}) failed: {reason}; check the user, password and authSource in source.uri")]
    AuthFailed { uri: String, reason: String },
    #[error("the source ({uri}) is not a replica set, and change streams need one; start it with --replSet and run rs.initiate() (a single-node replica set is enough)")]
    NotReplicaSet { uri: String },
}

/// Checks that the source answers and is a replica set (or a sharded cluster).
pub async fn check_source(client: &Client, uri: &Uri) -> Result<(), SourceError> {
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .map_err(|e| {
            let uri = uri.to_string();
            let reason = describe(&e);
            if is_auth_failure(&e) {
                SourceError::AuthFailed { uri, reason }
            } else {
                SourceError::Unreachable { uri, reason }
            }
        })?;
    let replica_set = hello.get_str("setName").is_ok() || hello.get_str("msg") == Ok("isdbgrid");
    if !replica_set {
        return Err(SourceError::NotReplicaSet {
            uri: uri.to_string(),
        });
    }
    Ok(())
}

/// The server's current time, from `hello.localTime`.
pub async fn server_time(client: &Client) -> mongodb::error::Result<DateTime> {
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await?;
    Ok(hello
        .get_datetime("localTime")
        .copied()
        .unwrap_or_else(|_| DateTime::now()))
}

/// True when the error says the resume point is no longer in the source's history:
/// ChangeStreamHistoryLost (286), CappedPositionLost (136), or ChangeStreamFatalError (280)
/// raised because the token cannot be found.
pub fn is_history_lost(e: &mongodb::error::Error) -> bool {
    if let Some(code) = error_code(e) {
        if code == 286 || code == 136 {
            return true;
        }
        if code == 280 {
            let msg = e.to_string().to_ascii_lowercase();
            return msg.contains("resume") || msg.contains("oplog") || msg.contains("history");
        }
    }
    let msg = e.to_string().to_ascii_lowercase();
    msg.contains("changestreamhistorylost")
        || msg.contains("resume point may no longer be in the oplog")
}

/// Whether the server refuses the replicator's user: its credentials (see
/// [`is_auth_failure`]), or a privilege it needs (code 13). Retrying will not mend it.
pub fn is_refusal(e: &mongodb::error::Error) -> bool {
    is_auth_failure(e) || error_code(e) == Some(13)
}

/// Whether the server refused the credentials (not: the user lacks a privilege).
/// The server's answer decides, not the driver's kind: the driver reports any error during
/// the login exchange as an authentication error (a server shutting down, say), and that is
/// an outage to ride out, not a refusal.
pub fn is_auth_failure(e: &mongodb::error::Error) -> bool {
    // 18 AuthenticationFailed; 334 MechanismUnavailable (no credentials for the mechanism).
    std::iter::successors(Some(e), |&c| driver_cause(c))
        .any(|c| matches!(error_code(c), Some(18) | Some(334)))
}

/// The driver error that caused `e`, if one did (the driver keeps it boxed).
fn driver_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a mongodb::error::Error> {
    let cause = e.source()?;
    cause.downcast_ref::<mongodb::error::Error>().or_else(|| {
        cause
            .downcast_ref::<Box<mongodb::error::Error>>()
            .map(|b| &**b)
    })
}

/// Fails when `client`'s deployment answers and refuses the replicator's user: wrong
/// credentials, none where the server requires them, or a user without access to
/// `database`. A deployment that does not answer within `within` passes: it is down, which
/// the replicator rides out.
pub async fn verify_access(
    client: &Client,
    what: String,
    uri: &Uri,
    database: &str,
    within: Duration,
) -> anyhow::Result<()> {
    // `hello` and `ping` need no authentication; listing the collections needs the access
    // the replicator needs anyway.
    let db = client.database(database);
    let list = db
        .run_command(doc! {"listCollections": 1, "nameOnly": true, "authorizedCollections": true});
    match tokio::time::timeout(within, list).await {
        Ok(Err(e)) => refused(&e, &what, uri).map_or(Ok(()), Err),
        _ => Ok(()),
    }
}

/// The error to stop with when `e` says the server refuses the replicator's user.
pub fn refused(e: &mongodb::error::Error, what: &str, uri: &Uri) -> Option<anyhow::Error> {
    if is_auth_failure(e) {
        Some(anyhow::anyhow!(
            "authentication to {what} ({uri}) failed: {}; check the user, password and authSource in its URI",
            describe(e)
        ))
    } else if is_refusal(e) {
        Some(anyhow::anyhow!(
            "{what} ({uri}) refuses the replicator's user: {}; give the URI a user with the roles in docs/operations.md (\"Least-privilege roles\")",
            describe(e)
        ))
    } else {
        None
    }
}

/// The server's error code, for command and write errors.
pub fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    }
}

/// A driver error as one short line: for each error in its chain (the error, then what
/// caused it), the server's code, name and message for command and write errors, the
/// driver's message otherwise; without labels or the raw server response; secrets
/// redacted. Callers match codes in it (`(code 388)`), so a reason is never dropped for
/// being in a wrapped error.
pub fn describe(e: &mongodb::error::Error) -> String {
    let mut parts = vec![reason(e)];
    let mut here: &(dyn std::error::Error + 'static) = e;
    while let Some(cause) = here.source() {
        let r = match driver_cause(here) {
            Some(m) => reason(m),
            None => cause.to_string(),
        };
        if !parts.iter().any(|p| p.contains(&r)) {
            parts.push(r);
        }
        here = cause;
    }
    bounded_message(&redact(&parts.join(": ")))
}

/// One error's own reason, without what the driver appends (labels, source, response).
fn reason(e: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Command(c) => format!("{} (code {}): {}", c.code_name, c.code, c.message),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            format!("write error (code {}): {}", w.code, w.message)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("write concern error (code {}): {}", w.code, w.message)
        }
        ErrorKind::Authentication { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
