//! The test harness: real database servers and real replicator processes.
//!
//! - [`Server`] starts a SecantusDB server (or a real `mongod` as a single-node replica set,
//!   when `mongod` is on PATH) on a free port in its own temporary directory. It can be
//!   killed (SIGKILL) and restarted on the same port and data, and is killed when dropped,
//!   so a failing test leaves nothing running.
//! - [`Replicator`] runs the built `mongo-replicator` binary with a config of its own; it
//!   can be killed with SIGKILL, stopped with SIGTERM, paused with SIGSTOP/SIGCONT, and is
//!   killed when dropped. Its log is printed when a test fails, to explain why.
//! - [`wait_for`] polls a condition until a deadline: tests never sleep a fixed time to
//!   wait for something.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::{Client, Collection};

pub mod collation;
pub mod secure;
pub use secure::ROOT_PASSWORD;

/// Where the install script puts the server, unless `SECANTUS_BIN` says otherwise.
fn secantus_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SECANTUS_BIN") {
        return PathBuf::from(p);
    }
    let root = std::env::var("SECANTUS_ROOT").unwrap_or_else(|_| {
        format!(
            "{}/.cache/mongo-replicator/secantus",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let p = PathBuf::from(root).join("bin/secantusd-rs");
    if p.exists() {
        return p;
    }
    if let Some(found) = which("secantusd-rs") {
        return found;
    }
    panic!(
        "the test server is not installed: run scripts/install-test-server.sh (or set SECANTUS_BIN)"
    );
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// True when the suite runs against a real `mongod` (found on PATH, unless
/// `MONGO_REPLICATOR_TEST_SERVER=secantus`).
pub fn using_mongod() -> bool {
    std::env::var("MONGO_REPLICATOR_TEST_SERVER").as_deref() != Ok("secantus")
        && which("mongod").is_some()
}

/// Options for a test server.
#[derive(Clone, Default)]
pub struct ServerOpts {
    /// No replica set (change streams unavailable).
    pub standalone: bool,
    /// Write a no-op to the oplog every N seconds while idle (mongod does every 10 s).
    pub noop_heartbeat_secs: Option<u32>,
    /// Keep at most this many oplog entries (to provoke "history lost").
    pub oplog_max_entries: Option<u64>,
    /// Acknowledge writes before they are synced to disk, so that a kill -9 can lose
    /// acknowledged writes (as a mongod without journaling, or a disk that lies, would).
    pub no_sync: bool,
    /// Require SCRAM authentication; a `root` user is created at first start (see
    /// [`ROOT_PASSWORD`]) and the harness's own clients use it.
    pub auth: bool,
    /// Serve TLS with these certificates.
    pub tls: Option<secure::ServerTls>,
    /// The storage engine's cache (default 128M, as many servers run side by side). A write
    /// burst of tens of megabytes can stall a small one for good on the test server (see
    /// tests/README).
    pub cache_size: Option<&'static str>,
}

pub struct Server {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    opts: ServerOpts,
    log: PathBuf,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(ServerOpts::default()).await
    }

    pub async fn start_with(opts: ServerOpts) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("mr-server-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join("server.log");
        let mut s = Server {
            port: 0,
            dir,
            child: None,
            opts,
            log,
        };
        s.spawn(0).await;
        s
    }

    async fn spawn(&mut self, port: u16) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let (child, port) = if using_mongod() {
            let port = if port == 0 { free_port() } else { port };
            let mut cmd = Command::new("mongod");
            cmd.args(["--bind_ip", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dbpath")
                .arg(&data)
                .args(["--setParameter", "enableTestCommands=1"]);
            if !self.opts.standalone {
                cmd.args(["--replSet", "rs0"]);
            }
            if let Some(n) = self.opts.oplog_max_entries {
                // mongod sizes the oplog in MB; 1 MB is its floor.
                let _ = n;
                cmd.args(["--oplogSize", "1"]);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start mongod");
            (child, port)
        } else {
            let mut cmd = Command::new(secantus_bin());
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--storage-path")
                .arg(&data)
                .args(["--log-file-max", "16MB"])
                .args(["--cache-size", self.opts.cache_size.unwrap_or("128M")])
                .arg("--enable-test-commands");
            if !self.opts.no_sync {
                // Journaled writes survive a kill -9, as acknowledged writes do on mongod
                // (SecantusDB otherwise acknowledges before its log is synced).
                cmd.arg("--sync-on-commit");
            }
            if self.opts.standalone {
                cmd.arg("--standalone");
            }
            if let Some(s) = self.opts.noop_heartbeat_secs {
                cmd.args(["--noop-heartbeat-seconds", &s.to_string()]);
            }
            if let Some(n) = self.opts.oplog_max_entries {
                cmd.args(["--oplog-max-entries", &n.to_string()]);
            }
            if self.opts.auth {
                cmd.arg("--auth");
            }
            if let Some(tls) = &self.opts.tls {
                tls.add_args(&mut cmd);
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("log");
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .expect("start test server");
            let stdout = child.stdout.take().expect("stdout");
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut found = 0u16;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(rest) = line.trim().rsplit_once(':') {
                    if line.contains("listening on") {
                        found = rest.1.trim().parse().unwrap_or(0);
                        break;
                    }
                }
            }
            assert!(found != 0, "test server did not report its port");
            // Keep draining stdout so the server never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                    sink.clear();
                }
            });
            (child, found)
        };
        self.child = Some(child);
        self.port = port;
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        // Without credentials: `ping` needs none, and the first user may not exist yet.
        let client = Client::with_uri_str(self.uri_with("", ""))
            .await
            .expect("client");
        wait_for("server answers ping", Duration::from_secs(60), || {
            let c = client.clone();
            async move {
                c.database("admin")
                    .run_command(doc! {"ping": 1})
                    .await
                    .is_ok()
            }
        })
        .await;
        if self.opts.auth {
            secure::create_root(&client).await;
        }
        if using_mongod() && !self.opts.standalone {
            let _ = client
                .database("admin")
                .run_command(doc! {"replSetInitiate": {"_id": "rs0", "members": [{"_id": 0, "host": format!("127.0.0.1:{}", self.port)}]}})
                .await;
            wait_for("replica set primary", Duration::from_secs(60), || {
                let c = client.clone();
                async move {
                    c.database("admin")
                        .run_command(doc! {"hello": 1})
                        .await
                        .map(|h| h.get_bool("isWritablePrimary").unwrap_or(false))
                        .unwrap_or(false)
                }
            })
            .await;
        }
    }

    /// The URI the replicator is given (direct connection: the server is one node).
    pub fn uri(&self) -> String {
        self.direct_uri()
    }

    /// A direct URI as the harness's own user (`root` on a server with auth).
    pub fn direct_uri(&self) -> String {
        if self.opts.auth {
            self.uri_as("root", ROOT_PASSWORD)
        } else {
            self.uri_with("", "")
        }
    }

    /// A direct URI that logs in as `user` (with `authSource=admin`), with the TLS options
    /// this server needs.
    pub fn uri_as(&self, user: &str, password: &str) -> String {
        self.uri_with(&format!("{user}:{password}@"), "&authSource=admin")
    }

    fn uri_with(&self, credentials: &str, options: &str) -> String {
        let tls = self
            .opts
            .tls
            .as_ref()
            .map(|t| t.client_options())
            .unwrap_or_default();
        format!(
            "mongodb://{credentials}127.0.0.1:{}/?directConnection=true{options}{tls}",
            self.port
        )
    }

    pub async fn client(&self) -> Client {
        let mut opts = mongodb::options::ClientOptions::parse(self.direct_uri())
            .await
            .expect("uri");
        opts.server_selection_timeout = Some(Duration::from_secs(5));
        Client::with_options(opts).expect("client")
    }

    pub async fn coll(&self, name: &str) -> Collection<Document> {
        self.client().await.database("app").collection(name)
    }

    /// SIGKILL the server (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it cleanly (SIGTERM, bounded wait, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates a unique index on `field` of `app.data` (a constraint the source may lack).
    pub async fn unique_index(&self, field: &str) {
        unique_index_on(&self.coll("data").await, field).await;
    }

    /// The quarantine records the replicator keeps on this follower.
    pub async fn quarantine_records(&self) -> Vec<Document> {
        use futures::TryStreamExt;
        self.client()
            .await
            .database("mongo_replicator")
            .collection::<Document>("quarantine")
            .find(doc! {})
            .await
            .expect("read the quarantine")
            .try_collect()
            .await
            .expect("read the quarantine")
    }

    /// SIGSTOP: the server hangs, neither answering nor closing connections.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGSTOP);
            }
        }
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
        }
    }

    /// Keeps the server's directory (data and log) after the test, for a post-mortem.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server process's id while it runs (for figures from `/proc`, such as CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Copies the data directory to `dest` (stop the server first for a consistent copy).
    pub fn copy_data_to(&self, dest: &Path) {
        copy_dir(&self.data_dir(), dest);
    }

    /// Stops the server, replaces its data with the copy in `src` (an earlier snapshot), and
    /// starts it again on the same port.
    pub async fn restore_data_from(&mut self, src: &Path) {
        self.stop();
        let data = self.data_dir();
        std::fs::remove_dir_all(&data).expect("remove data");
        copy_dir(src, &data);
        let port = self.port;
        self.spawn(port).await;
    }

    /// Starts it again on the same port and data, after a kill or a stop.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.port;
        self.spawn(port).await;
    }

    /// Starts it again on the same port and data (after a clean stop if it is running).
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.port;
        // The port may linger briefly; retry the spawn a few times.
        self.spawn(port).await;
    }
}

/// Creates a unique index on `field` of `coll`.
pub async fn unique_index_on(coll: &Collection<Document>, field: &str) {
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {field: 1})
            .options(
                mongodb::options::IndexOptions::builder()
                    .unique(true)
                    .build(),
            )
            .build(),
    )
    .await
    .expect("unique index");
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port for a replicator's HTTP listener. Taken below the kernel's ephemeral range
/// (32768 and up), where servers started with `--port 0` land, so that a server started by a
/// parallel test cannot grab it between this check and the replicator's bind; spread by
/// process id and a counter so that parallel tests do not pick the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 100) * 120;
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (20_000 + (offset + n) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

fn copy_dir(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).expect("create dir");
    for entry in std::fs::read_dir(src).expect("read dir") {
        let entry = entry.expect("entry");
        let to = dest.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`wait_for`] but returns false instead of panicking.
pub async fn poll_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config for one source and some followers, with test-friendly timings.
pub struct ConfigBuilder {
    pub source: String,
    pub followers: Vec<(String, String)>,
    pub collections: Vec<String>,
    pub extra: String,
    /// Lines added to every `[[followers]]` table.
    pub follower_extra: String,
    pub ttl: &'static str,
    pub renew: &'static str,
    /// The HTTP listener's host (the port is the node's).
    pub http_host: String,
    /// Lines added to the `[http]` table.
    pub http_extra: String,
    /// Followers that read their URI from a file instead: (name, file).
    pub uri_files: Vec<(String, PathBuf)>,
    /// Lines added to the `[source]` table (with no `collections`, the table has no
    /// `database` either: for `namespaces`).
    pub source_extra: String,
    /// Lines added to one follower's table: (name, lines).
    pub follower_lines: Vec<(String, String)>,
}

impl ConfigBuilder {
    pub fn new(source: &Server, followers: &[&Server]) -> ConfigBuilder {
        ConfigBuilder {
            source: source.uri(),
            followers: followers
                .iter()
                .enumerate()
                .map(|(i, f)| (format!("f{}", i + 1), f.uri()))
                .collect(),
            collections: vec!["data".into()],
            extra: String::new(),
            follower_extra: String::new(),
            ttl: "3s",
            renew: "500ms",
            http_host: "127.0.0.1".into(),
            http_extra: String::new(),
            uri_files: Vec::new(),
            source_extra: String::new(),
            follower_lines: Vec::new(),
        }
    }

    /// Adds lines to the table of follower `name` (`f1`, `f2`, ...).
    pub fn follower_line(mut self, name: &str, lines: &str) -> Self {
        self.follower_lines.push((name.into(), lines.into()));
        self
    }

    /// Appends raw TOML (for `[replication]` keys, say).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn render(&self, dir: &Path, http_port: u16) -> String {
        let colls: Vec<String> = self
            .collections
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        let mut s = if self.collections.is_empty() {
            format!(
                "[source]\nuri = \"{}\"\n{}\n\n",
                self.source, self.source_extra
            )
        } else {
            format!(
                "[source]\nuri = \"{}\"\ndatabase = \"app\"\ncollections = [{}]\n{}\n\n",
                self.source,
                colls.join(", "),
                self.source_extra
            )
        };
        for (name, uri) in &self.followers {
            let uri_line = match self.uri_files.iter().find(|(n, _)| n == name) {
                Some((_, file)) => format!("uri_file = \"{}\"", file.display()),
                None => format!("uri = \"{uri}\""),
            };
            let own: String = self
                .follower_lines
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, l)| format!("{l}\n"))
                .collect();
            s.push_str(&format!(
                "[[followers]]\nname = \"{name}\"\n{uri_line}\n{}\n{own}\n",
                self.follower_extra
            ));
        }
        let has = |section: &str| self.extra.contains(section);
        if !has("[checkpoint]") {
            s.push_str(&format!(
                "[checkpoint]\ntoken_file = \"{}\"\n\n",
                dir.join("tokens.json").display()
            ));
        }
        if !has("[lease]") {
            s.push_str(&format!(
                "[lease]\nttl = \"{}\"\nrenew_interval = \"{}\"\n\n",
                self.ttl, self.renew
            ));
        }
        s.push_str(&format!(
            "[http]\nlisten = \"{}:{http_port}\"\n{}\n",
            self.http_host, self.http_extra
        ));
        s.push_str(&self.extra);
        s
    }
}

/// A running `mongo-replicator run` process.
pub struct Replicator {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub http_port: u16,
    pub node_id: String,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    /// Environment variables for the process (after the harness's defaults).
    pub env: Vec<(String, String)>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mongo-replicator")
}

impl Replicator {
    /// Writes the config into a fresh directory and starts the process.
    pub fn start(config: &ConfigBuilder, node_id: &str) -> Replicator {
        Replicator::start_with_env(config, node_id, &[])
    }

    /// Like [`Replicator::start`], with extra environment variables.
    pub fn start_with_env(
        config: &ConfigBuilder,
        node_id: &str,
        env: &[(&str, &str)],
    ) -> Replicator {
        let dir = tempfile::Builder::new()
            .prefix("mr-node-")
            .tempdir()
            .expect("temp dir");
        let http_port = free_port();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config.render(dir.path(), http_port)).expect("config");
        let log = dir.path().join("replicator.log");
        let mut r = Replicator {
            dir,
            config_path,
            http_port,
            node_id: node_id.to_string(),
            child: None,
            log,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        r.spawn();
        r
    }

    /// Starts the process again with the same config and token file.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&self.config_path)
            .args(["--node-id", &self.node_id])
            .env("RUST_LOG", "info,mongo_replicator=debug")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start replicator");
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// When the process has exited on its own: its exit status (and it can be spawned
    /// again).
    pub fn reap(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's id while it runs (for figures from `/proc`, such as CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's peak resident memory so far, in KiB (`VmHWM`), while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Keeps the node's directory (config, log, token file) after the test.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("tokens.json")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// `/status` as JSON, or `None` when it does not answer.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let resp = reqwest::Client::new()
            .get(self.url("/status"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// Waits until the first follower reports `stopped` with a last error containing
    /// `needle`.
    pub async fn wait_stopped_with(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("pipeline stopped with `{needle}`"),
            timeout,
            || async {
                self.status().await.is_some_and(|s| {
                    s["followers"][0]["state"] == "stopped"
                        && s["followers"][0]["last_error"]
                            .as_str()
                            .is_some_and(|e| e.contains(needle))
                })
            },
        )
        .await;
    }

    /// The first follower's state in `/status`.
    pub async fn first_state(&self) -> Option<String> {
        self.status()
            .await
            .and_then(|s| s["followers"][0]["state"].as_str().map(str::to_string))
    }

    /// Waits until the first follower streams.
    pub async fn wait_streaming(&self, timeout: Duration) {
        wait_for("streaming", timeout, || async {
            self.first_state().await.as_deref() == Some("streaming")
        })
        .await;
    }

    /// `/metrics` as text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// POSTs to `path`; the status code, or 0 when the node does not answer.
    pub async fn post(&self, path: &str) -> u16 {
        reqwest::Client::new()
            .post(self.url(path))
            .send()
            .await
            .map(|resp| resp.status().as_u16())
            .unwrap_or(0)
    }

    /// The `quarantined` count of `follower` in `/status` (`u64::MAX` when unknown).
    pub async fn quarantined(&self, follower: &str) -> u64 {
        self.status()
            .await
            .and_then(|s| {
                s["followers"]
                    .as_array()?
                    .iter()
                    .find(|f| f["name"] == follower)
                    .and_then(|f| f["quarantined"].as_u64())
            })
            .unwrap_or(u64::MAX)
    }

    /// Waits until this node leads.
    pub async fn wait_leader(&self, timeout: Duration) {
        wait_for(&format!("{} leads", self.node_id), timeout, || async {
            self.role().await.as_deref() == Some("leader")
        })
        .await;
    }

    pub async fn role(&self) -> Option<String> {
        self.status()
            .await
            .and_then(|s| s["role"].as_str().map(str::to_string))
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
        }
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- replicator {} log (last lines) ----\n{}",
                self.node_id,
                tail(&self.log, 60)
            );
        }
    }
}

/// All documents of a collection, sorted by `dataId` then `_id`, as exact BSON.
pub async fn dump(coll: &Collection<Document>) -> Vec<Document> {
    use futures::TryStreamExt;
    coll.find(doc! {})
        .sort(doc! {"dataId": 1, "_id": 1})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("collect")
}

/// Waits until every follower holds exactly the source's documents (byte-exact BSON).
pub async fn wait_identical(
    source: &Collection<Document>,
    followers: &[Collection<Document>],
    timeout: Duration,
) {
    let ok = poll_until(timeout, || async {
        let want: Vec<Vec<u8>> = dump(source).await.iter().map(bytes).collect();
        for f in followers {
            let got: Vec<Vec<u8>> = dump(f).await.iter().map(bytes).collect();
            if got != want {
                return false;
            }
        }
        true
    })
    .await;
    if !ok {
        let want = dump(source).await;
        let mut report = String::new();
        for (i, f) in followers.iter().enumerate() {
            let got = dump(f).await;
            let missing: Vec<_> = want.iter().filter(|d| !got.contains(d)).take(5).collect();
            let extra: Vec<_> = got.iter().filter(|d| !want.contains(d)).take(5).collect();
            report.push_str(&format!(
                "follower #{i}: source {} docs, follower {} docs; missing e.g. {missing:?}; extra e.g. {extra:?}\n",
                want.len(),
                got.len()
            ));
        }
        panic!("followers differ from the source after {timeout:?}:\n{report}");
    }
}

/// Exact byte equality of the raw BSON (field order and numeric types included).
pub fn bytes(d: &Document) -> Vec<u8> {
    mongodb::bson::to_vec(d).expect("bson")
}

/// A background writer: inserts, updates and deletes on a key space until stopped.
/// Every write is acknowledged before the next one, so the source's final state is the
/// truth the followers must reach.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<tokio::task::JoinHandle<u64>>,
}

impl Writer {
    pub fn start(coll: Collection<Document>, prefix: &str, keys: u32) -> Writer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let prefix = prefix.to_string();
        let handle = tokio::spawn(async move {
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let k = format!("{prefix}{}", n % keys as u64);
                let res = match n % 5 {
                    0 | 1 => coll
                        .update_one(
                            doc! {"dataId": &k},
                            doc! {"$set": {"v": n as i64}, "$inc": {"writes": 1}},
                        )
                        .upsert(true)
                        .await
                        .map(|_| ()),
                    2 => coll
                        .update_one(doc! {"dataId": &k}, doc! {"$set": {"w": format!("x{n}")}})
                        .await
                        .map(|_| ()),
                    3 => coll.delete_one(doc! {"dataId": &k}).await.map(|_| ()),
                    _ => coll
                        .insert_one(doc! {"dataId": format!("{prefix}i{n}"), "n": n as i64})
                        .await
                        .map(|_| ()),
                };
                if res.is_err() {
                    // The source may be restarting; try again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                n += 1;
            }
            n
        });
        Writer {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops writing; returns the number of writes attempted.
    pub async fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.await.unwrap_or(0),
            None => 0,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A TCP proxy in front of a server, which a test can cut (close every connection and refuse
/// new ones) and restore: a network partition for one client only. It can also delay every
/// chunk of data, hang (stop moving data while connections stay open, as a network that
/// drops every packet), or go half-open (the server side is closed while the client's
/// connections stay open and silent).
pub struct Proxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    /// 0 normal, 1 cut, 2 hang, 3 half-open.
    mode: std::sync::atomic::AtomicU8,
    delay_ms: std::sync::atomic::AtomicU64,
    /// Bumped by cut and half-open: connections of an older generation end.
    generation: std::sync::atomic::AtomicU64,
}

const PROXY_NORMAL: u8 = 0;
const PROXY_CUT: u8 = 1;
const PROXY_HANG: u8 = 2;
const PROXY_HALF_OPEN: u8 = 3;

impl ProxyState {
    fn mode(&self) -> u8 {
        self.mode.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Moves data from `from` to `to` while the proxy allows; returns both halves when either
/// side of the connection closes (`done`, shared by both directions) or the connection's
/// generation ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: std::sync::Arc<ProxyState>,
    generation: u64,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let over = |state: &ProxyState| done.load(Ordering::SeqCst) || state.generation() != generation;
    loop {
        if over(&state) {
            return (from, to);
        }
        if state.mode() == PROXY_HANG {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    done.store(true, Ordering::SeqCst);
                    return (from, to);
                }
                Ok(n) => n,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
        };
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // Hung while this chunk was in flight: hold it until the network heals.
        while state.mode() == PROXY_HANG && !over(&state) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if over(&state) || to.write_all(&buf[..n]).await.is_err() {
            done.store(true, Ordering::SeqCst);
            return (from, to);
        }
    }
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                match st.mode() {
                    PROXY_CUT => {
                        drop(inbound);
                        continue;
                    }
                    PROXY_HALF_OPEN => {
                        // Accepted, and never answered, until the proxy heals.
                        let st = st.clone();
                        tokio::spawn(async move {
                            while st.mode() == PROXY_HALF_OPEN {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            drop(inbound);
                        });
                        continue;
                    }
                    _ => {}
                }
                let st = st.clone();
                let generation = st.generation();
                tokio::spawn(async move {
                    let Ok(outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let ((ri, wo), (ro, wi)) = tokio::join!(
                        pump(ri, wo, st.clone(), generation, done.clone()),
                        pump(ro, wi, st.clone(), generation, done),
                    );
                    // Half-open: the server's side closes, the client's stays open and
                    // silent until the proxy heals.
                    drop((ro, wo));
                    while st.mode() == PROXY_HALF_OPEN {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    drop((ri, wi));
                });
            }
        });
        Proxy { port, state, task }
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    fn set(&self, mode: u8, new_generation: bool) {
        use std::sync::atomic::Ordering;
        self.state.mode.store(mode, Ordering::SeqCst);
        if new_generation {
            self.state.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.set(PROXY_CUT, true);
    }

    /// Moves no data, while every connection stays open.
    pub fn hang(&self) {
        self.set(PROXY_HANG, false);
    }

    /// Closes the server side of every connection, and leaves the client side open and
    /// silent; new connections are accepted and never answered.
    pub fn half_open(&self) {
        self.set(PROXY_HALF_OPEN, true);
    }

    /// Delays every chunk of data by `delay` (zero: none).
    pub fn delay(&self, delay: Duration) {
        self.state.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Back to normal (no delay), for new and hung connections.
    pub fn restore(&self) {
        self.delay(Duration::ZERO);
        self.set(PROXY_NORMAL, false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Starts `n` replicator nodes with one shared config (each with its own token file and
/// HTTP port, as on separate hosts).
pub fn start_nodes(cfg: &ConfigBuilder, n: usize) -> Vec<Replicator> {
    (1..=n)
        .map(|i| Replicator::start(cfg, &format!("node-{i}")))
        .collect()
}

/// The indexes of the nodes that report `leader`.
pub async fn leaders(nodes: &[Replicator]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.role().await.as_deref() == Some("leader") {
            out.push(i);
        }
    }
    out
}

/// A follower whose checkpoint fell off the source's oplog: replicates ten documents while
/// streaming, stops the node, writes past the source's tiny oplog and prunes it, then starts
/// the node again. `replication` is extra `[replication]` TOML. `None` against mongod (it
/// cannot prune on demand).
pub async fn history_lost_case(replication: &str) -> Option<(Server, Server, Replicator)> {
    if using_mongod() {
        eprintln!("skipped: needs the test server's oplog pruning command");
        return None;
    }
    let converge = Duration::from_secs(60);
    let src = Server::start_with(ServerOpts {
        oplog_max_entries: Some(20),
        ..Default::default()
    })
    .await;
    let f1 = Server::start().await;
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra(&format!("[replication]\n{replication}\n"));
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_streaming(converge).await;
    let s = src.coll("data").await;
    for i in 0..10 {
        s.insert_one(doc! {"dataId": format!("a{i}")})
            .await
            .expect("insert");
    }
    wait_identical(&s, &[f1.coll("data").await], converge).await;
    r.terminate().await;
    for i in 0..100 {
        s.insert_one(doc! {"dataId": format!("b{i}")})
            .await
            .expect("insert");
    }
    s.delete_one(doc! {"dataId": "a3"}).await.expect("delete");
    let pruned = src
        .client()
        .await
        .database("admin")
        .run_command(doc! {"secantusAdmin.pruneOplog": 1})
        .await
        .expect("prune");
    assert!(pruned.get_i64("pruned").unwrap_or(0) > 0, "{pruned}");
    r.spawn();
    Some((src, f1, r))
}

/// `mongo-replicator check --config CONFIG EXTRA..` with short rechecks: its exit code and
/// its output (stdout then stderr).
pub fn run_check(config: &Path, extra: &[&str]) -> (i32, String) {
    run_check_env(config, extra, &[])
}

/// [`run_check`] with extra environment variables.
pub fn run_check_env(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut args = vec!["--recheck-delay", "300ms", "--recheck-rounds", "3"];
    args.extend_from_slice(extra);
    run_cli("check", config, &args, env)
}

/// `mongo-replicator COMMAND --config CONFIG ARGS...` with `env`: its exit code, and its
/// standard output then its standard error.
pub fn run_cli(command: &str, config: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin())
        .args([command, "--config"])
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs a database command that must succeed.
pub async fn run_cmd(db: &mongodb::Database, c: Document) {
    db.run_command(c.clone())
        .await
        .unwrap_or_else(|e| panic!("{c}: {e}"));
}
