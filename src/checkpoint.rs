//! Checkpoints: the change-stream resume position of each (collection, follower) pair, and
//! the token file that keeps them on local disk.
//!
//! The follower's own checkpoint, committed with its data, is the authority on what that
//! follower holds. The token file is a cache of it for resuming after a crash: each entry
//! names the revision (`write_id`) of the follower checkpoint it extends (with the idle
//! post-batch tokens seen since), and is used only while the follower still holds exactly
//! that revision. A follower wiped, restored from a snapshot, or rolled back by a crash holds
//! another revision (or none), and then its own checkpoint wins.
//!
//! Invariants:
//! - a checkpoint only ever names a change its follower has acknowledged (the pipeline calls
//!   [`CheckpointStore::advance`] after the follower's write returns);
//! - it never moves backwards: an older cluster time than the stored one is refused (only an
//!   explicit [`CheckpointStore::reset`], for a resync, removes one);
//! - the file is replaced atomically (temp file, fsync, rename, fsync of the directory), is
//!   versioned, and has mode 0600 because resume tokens reveal document keys.
//!
//! A corrupt or foreign file stops the service with a message saying how to reset it; it is
//! never silently replaced, since starting from "now" would skip changes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mongodb::bson::{Bson, Document, Timestamp};
use serde::{Deserialize, Serialize};

pub const TOKEN_FILE_VERSION: u32 = 1;

/// One resume position.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The change-stream resume token (`_id` of the last acknowledged change, or a post-batch
    /// token of an idle stream).
    pub token: Document,
    /// The cluster time of that change, when known.
    pub cluster_time: Option<Timestamp>,
    /// `Some` while an initial sync is still copying: the copy resumes after this source
    /// `_id` (`Bson::Null` when nothing was copied yet), and streaming starts from `token`.
    pub copy_after: Option<Bson>,
    /// Wall-clock milliseconds when this checkpoint was taken.
    pub taken_at_ms: i64,
    /// The revision of the follower checkpoint this position extends (hex ObjectId): the one
    /// written with it, or, for an idle position, the last one written before it.
    pub write_id: Option<String>,
}

impl Checkpoint {
    pub fn new(token: Document, cluster_time: Option<Timestamp>) -> Checkpoint {
        let cluster_time = cluster_time.or_else(|| token_cluster_time(&token));
        Checkpoint {
            token,
            cluster_time,
            copy_after: None,
            taken_at_ms: now_ms(),
            write_id: None,
        }
    }

    /// True when `self` is at or after `other` in the source's history.
    pub fn is_not_before(&self, other: &Checkpoint) -> bool {
        match (self.cluster_time, other.cluster_time) {
            (Some(a), Some(b)) => ts_key(a) >= ts_key(b),
            _ => true,
        }
    }
}

pub fn ts_key(t: Timestamp) -> (u32, u32) {
    (t.time, t.increment)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The cluster time inside a MongoDB resume token. The token's `_data` is a hex key string
/// whose first value is the cluster time (type byte 0x82, then seconds and increment,
/// big-endian). Returns `None` for tokens of another shape.
///
/// The test server (SecantusDB) encodes `_data` as a hex BSON document whose `t` field is
/// the cluster time; that shape is read too, so lag and headroom are known in tests.
pub fn token_cluster_time(token: &Document) -> Option<Timestamp> {
    let data = token.get_str("_data").ok()?;
    if !data.starts_with("82") {
        let bytes = hex::decode(data).ok()?;
        let doc = Document::from_reader(&mut bytes.as_slice()).ok()?;
        return doc.get_timestamp("t").ok();
    }
    if data.len() < 18 {
        return None;
    }
    let bytes = hex::decode(&data[2..18]).ok()?;
    let time = u32::from_be_bytes(bytes[0..4].try_into().ok()?);
    let increment = u32::from_be_bytes(bytes[4..8].try_into().ok()?);
    Some(Timestamp { time, increment })
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("token file {path}: {reason}")]
    Unusable { path: String, reason: String },
    #[error("token file {path} is corrupt ({reason}); it was left as it is. {RESET_HELP}")]
    Corrupt { path: String, reason: String },
    #[error("token file {path} has version {found}, this build reads version {TOKEN_FILE_VERSION}; it was left as it is. {RESET_HELP}")]
    Version { path: String, found: u64 },
    #[error("token file {path} belongs to source database `{found}`, not `{expected}`; it was left as it is. {RESET_HELP}")]
    Foreign {
        path: String,
        found: String,
        expected: String,
    },
    #[error("cannot write token file {path}: {reason}")]
    Io { path: String, reason: String },
}

const RESET_HELP: &str = "To reset: stop the service and move the file aside; on restart each follower resumes from the checkpoint stored on it, or gets an initial sync";

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    source_database: String,
    /// collection -> follower -> entry
    checkpoints: BTreeMap<String, BTreeMap<String, FileEntry>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    token: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_time: Option<FileTs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy_after: Option<serde_json::Value>,
    taken_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    write_id: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct FileTs {
    t: u32,
    i: u32,
}

#[derive(Default)]
struct Inner {
    map: BTreeMap<(String, String), Checkpoint>,
    dirty: bool,
}

/// The in-memory checkpoints, written through to the token file by [`CheckpointStore::flush`].
#[derive(Clone)]
pub struct CheckpointStore {
    path: PathBuf,
    source_database: String,
    inner: Arc<Mutex<Inner>>,
    /// Serialises file writes, so two flushes never race on the temp file.
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl CheckpointStore {
    /// Loads the token file; a missing file is an empty store. A temp file left by a crash
    /// mid-write is ignored (the rename never happened, so the old file is the truth).
    pub fn open(path: &Path, source_database: &str) -> Result<CheckpointStore, TokenFileError> {
        let display = path.display().to_string();
        let corrupt = |reason: String| TokenFileError::Corrupt {
            path: display.clone(),
            reason,
        };
        prepare_state_dir(path).map_err(|e| TokenFileError::Unusable {
            path: display.clone(),
            reason: format!("cannot create its directory: {e}"),
        })?;
        let mut map = BTreeMap::new();
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(corrupt(format!("cannot read it: {e}"))),
            Ok(bytes) => {
                let value: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
                let version = value.get("version").and_then(|v| v.as_u64());
                match version {
                    Some(v) if v == TOKEN_FILE_VERSION as u64 => {}
                    Some(found) => {
                        return Err(TokenFileError::Version {
                            path: display,
                            found,
                        })
                    }
                    None => return Err(corrupt("no version field".into())),
                }
                let file: FileFormat = serde_json::from_value(value)
                    .map_err(|e| corrupt(format!("unexpected content: {e}")))?;
                if file.source_database != source_database {
                    return Err(TokenFileError::Foreign {
                        path: display,
                        found: file.source_database,
                        expected: source_database.to_string(),
                    });
                }
                for (coll, followers) in file.checkpoints {
                    for (follower, e) in followers {
                        let token = match Bson::try_from(e.token) {
                            Ok(Bson::Document(d)) => d,
                            _ => {
                                return Err(corrupt(format!(
                                    "the token of {coll}/{follower} is not a document"
                                )))
                            }
                        };
                        let copy_after = match e.copy_after {
                            None => None,
                            Some(v) => Some(Bson::try_from(v).map_err(|err| {
                                corrupt(format!("copy_after of {coll}/{follower}: {err}"))
                            })?),
                        };
                        map.insert(
                            (coll.clone(), follower),
                            Checkpoint {
                                token,
                                cluster_time: e.cluster_time.map(|t| Timestamp {
                                    time: t.t,
                                    increment: t.i,
                                }),
                                copy_after,
                                taken_at_ms: e.taken_at_ms,
                                write_id: e.write_id,
                            },
                        );
                    }
                }
            }
        }
        Ok(CheckpointStore {
            path: path.to_path_buf(),
            source_database: source_database.to_string(),
            inner: Arc::new(Mutex::new(Inner { map, dirty: false })),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, collection: &str, follower: &str) -> Option<Checkpoint> {
        self.lock()
            .map
            .get(&(collection.to_string(), follower.to_string()))
            .cloned()
    }

    /// Records an acknowledged position. Returns false (and changes nothing) when it is older
    /// than the stored one: checkpoints never move backwards.
    pub fn advance(&self, collection: &str, follower: &str, cp: Checkpoint) -> bool {
        let mut inner = self.lock();
        let key = (collection.to_string(), follower.to_string());
        if let Some(old) = inner.map.get(&key) {
            if !cp.is_not_before(old) {
                tracing::debug!(
                    collection,
                    follower,
                    "refused a checkpoint older than the stored one"
                );
                return false;
            }
            if old == &cp {
                return true;
            }
        }
        inner.map.insert(key, cp);
        inner.dirty = true;
        true
    }

    /// Sets a pair's checkpoint to the one its follower holds, even when that is older: the
    /// follower is the authority, and the file only caches it.
    pub fn replace(&self, collection: &str, follower: &str, cp: Checkpoint) {
        let mut inner = self.lock();
        let key = (collection.to_string(), follower.to_string());
        if inner.map.get(&key) != Some(&cp) {
            inner.map.insert(key, cp);
            inner.dirty = true;
        }
    }

    /// Forgets a pair's checkpoint (for a resync, which copies the follower again).
    pub fn reset(&self, collection: &str, follower: &str) {
        let mut inner = self.lock();
        if inner
            .map
            .remove(&(collection.to_string(), follower.to_string()))
            .is_some()
        {
            inner.dirty = true;
        }
    }

    /// Writes the file if anything changed since the last write.
    pub async fn flush(&self) -> Result<(), TokenFileError> {
        let _guard = self.write_lock.lock().await;
        let bytes = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            self.encode(&inner.map)
        };
        let path = self.path.clone();
        let res = tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = res {
            self.lock().dirty = true;
            return Err(TokenFileError::Io {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            });
        }
        Ok(())
    }

    fn encode(&self, map: &BTreeMap<(String, String), Checkpoint>) -> Vec<u8> {
        let mut checkpoints: BTreeMap<String, BTreeMap<String, FileEntry>> = BTreeMap::new();
        for ((coll, follower), cp) in map {
            checkpoints.entry(coll.clone()).or_default().insert(
                follower.clone(),
                FileEntry {
                    token: Bson::Document(cp.token.clone()).into_canonical_extjson(),
                    cluster_time: cp.cluster_time.map(|t| FileTs {
                        t: t.time,
                        i: t.increment,
                    }),
                    copy_after: cp.copy_after.clone().map(|b| b.into_canonical_extjson()),
                    taken_at_ms: cp.taken_at_ms,
                    write_id: cp.write_id.clone(),
                },
            );
        }
        let file = FileFormat {
            version: TOKEN_FILE_VERSION,
            source_database: self.source_database.clone(),
            checkpoints,
        };
        let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Flushes every `interval` until `stop` is cancelled, then once more.
    pub async fn flush_every(&self, interval: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.flush().await {
                tracing::error!(error = %e, "checkpoint flush failed; will retry");
            }
        }
    }
}

/// temp file (mode 0600), fsync, rename over the old file, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = state_dir(path);
    create_private_dir(&dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A temp file left by a crash is stale; whatever sits at that name (a symlink planted
    // there, say) is removed, never followed, and the new file is created exclusively.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(())
}

/// The directory that holds the token file.
fn state_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` (and missing parents) readable by its owner only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates the state directory (mode 0700) if it is missing, and warns when an existing one
/// can be read or entered by other users.
fn prepare_state_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = state_dir(path);
    create_private_dir(&dir)?;
    let mode = std::fs::metadata(&dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:o}"),
            "the token file's directory is open to other users; chmod 700 it (or point checkpoint.token_file at a directory of its own)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn a_symlink_at_the_temp_name_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let path = dir.path().join("state").join("t.json");
        create_private_dir(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, path.with_file_name("t.json.tmp")).unwrap();
        write_atomically(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn the_state_directory_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("tokens.json");
        let store = CheckpointStore::open(&path, "app").unwrap();
        drop(store);
        for d in [dir.path().join("a"), dir.path().join("a").join("b")] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    fn cp(t: u32) -> Checkpoint {
        Checkpoint::new(doc! {"_data": format!("82{t:08X}00000001")}, None)
    }

    #[test]
    fn cluster_time_is_read_from_mongodb_tokens() {
        let ts = token_cluster_time(&doc! {"_data": "8265A1B2C3000000042B0229296E04"}).unwrap();
        assert_eq!(ts.time, 0x65A1B2C3);
        assert_eq!(ts.increment, 4);
        assert!(token_cluster_time(&doc! {"_data": "zz"}).is_none());
        let secantus = "2B00000012730002000000000000001174000500000070CA086B026E000100000000036B00050000000000";
        let ts = token_cluster_time(&doc! {"_data": secantus}).unwrap();
        assert_eq!((ts.time, ts.increment), (0x6B08CA70, 5));
        assert!(token_cluster_time(&doc! {"x": 1}).is_none());
    }

    #[tokio::test]
    async fn round_trips_through_the_file_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokens.json");
        let store = CheckpointStore::open(&path, "app").unwrap();
        let mut c = cp(100);
        c.copy_after = Some(Bson::ObjectId(mongodb::bson::oid::ObjectId::new()));
        c.write_id = Some(mongodb::bson::oid::ObjectId::new().to_hex());
        assert!(store.advance("data", "f1", c.clone()));
        store.flush().await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = CheckpointStore::open(&path, "app").unwrap();
        assert_eq!(again.get("data", "f1"), Some(c));
        assert_eq!(again.get("data", "f2"), None);
    }

    #[test]
    fn never_moves_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("t.json"), "app").unwrap();
        assert!(store.advance("c", "f", cp(200)));
        assert!(!store.advance("c", "f", cp(100)));
        assert_eq!(store.get("c", "f").unwrap().cluster_time.unwrap().time, 200);
        assert!(store.advance("c", "f", cp(300)));
        // The follower's own (older) checkpoint replaces the cached one.
        store.replace("c", "f", cp(150));
        assert_eq!(store.get("c", "f").unwrap().cluster_time.unwrap().time, 150);
        store.reset("c", "f");
        assert!(store.get("c", "f").is_none());
    }

    #[test]
    fn corrupt_file_is_refused_with_reset_help() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, b"{not json").unwrap();
        let e = CheckpointStore::open(&path, "app")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("corrupt") && e.contains("To reset"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{not json");
    }

    #[test]
    fn foreign_and_future_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(
            &path,
            br#"{"version":1,"source_database":"other","checkpoints":{}}"#,
        )
        .unwrap();
        let e = CheckpointStore::open(&path, "app")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("belongs to source database `other`"), "{e}");
        std::fs::write(&path, br#"{"version":9,"checkpoints":{}}"#).unwrap();
        let e = CheckpointStore::open(&path, "app")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("version 9"), "{e}");
    }

    #[test]
    fn leftover_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(dir.path().join("t.json.tmp"), b"{half").unwrap();
        let store = CheckpointStore::open(&path, "app").unwrap();
        assert!(store.get("c", "f").is_none());
    }
}
