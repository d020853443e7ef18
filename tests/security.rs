//! Security on real servers: authentication with least-privileged built-in roles, TLS and
//! mutual TLS, secrets from the environment and from files, the HTTP admin token and the
//! HTTP server's limits, and no secret in any output.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::secure::{create_user, files_containing, TestCa};
use common::*;
use mongodb::bson::doc;

/// A password with characters that must be escaped in a URI, as written there.
const SOURCE_PW_ENCODED: &str = "Src%23pw%2F7Qx%40z";
/// The same, as the server knows it.
const SOURCE_PW: &str = "Src#pw/7Qx@z";
const FOLLOWER_PW: &str = "Fol-pw-9Kd2hV";
const TOKEN: &str = "adm1n-t0ken-6b2f0c1e9d";

/// Source: `read` on the replicated database, `readWrite` on the lease database.
async fn source_user(server: &Server) {
    create_user(
        &server.client().await,
        "repl",
        SOURCE_PW,
        &[("read", "app"), ("readWrite", "mongo_replicator")],
    )
    .await;
}

/// Follower: `readWrite` on the replicated database and on the state database.
async fn follower_user(server: &Server) {
    create_user(
        &server.client().await,
        "repl",
        FOLLOWER_PW,
        &[("readWrite", "app"), ("readWrite", "mongo_replicator")],
    )
    .await;
}

/// `mongo-replicator COMMAND --config CONFIG`.
fn cli(command: &str, config: &std::path::Path) -> (i32, String) {
    run_cli(command, config, &[], &[])
}

/// The node's environment: the source password, and debug logging.
const NODE_ENV: &[(&str, &str)] = &[
    ("MR_TEST_SOURCE_PW", SOURCE_PW_ENCODED),
    ("RUST_LOG", "debug"),
];

/// The whole path with auth and TLS: a source over TLS, one follower over mutual TLS, one
/// over plain TCP; every user holds only built-in roles; the source password comes from
/// the environment, a follower's URI from a file. The node logs at debug level. Replication,
/// check and repair work, and no password shows in any log, output, status or file.
#[tokio::test(flavor = "multi_thread")]
async fn least_privileged_users_over_tls_replicate_and_no_secret_leaks() {
    let ca = TestCa::generate();
    let src = Server::start_with(ServerOpts {
        auth: true,
        tls: Some(ca.server_tls(false)),
        ..Default::default()
    })
    .await;
    let f1 = Server::start_with(ServerOpts {
        auth: true,
        tls: Some(ca.server_tls(true)),
        ..Default::default()
    })
    .await;
    let f2 = Server::start_with(ServerOpts {
        auth: true,
        ..Default::default()
    })
    .await;
    source_user(&src).await;
    follower_user(&f1).await;
    follower_user(&f2).await;

    let secrets_dir = tempfile::tempdir().unwrap();
    let f1_uri_file = secrets_dir.path().join("f1-uri");
    std::fs::write(&f1_uri_file, f1.uri_as("repl", FOLLOWER_PW) + "\n").unwrap();
    let token_file = secrets_dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    let mut cfg = ConfigBuilder::new(&src, &[&f1, &f2]);
    cfg.source = src.uri_as("repl", "${MR_TEST_SOURCE_PW}");
    cfg.followers[0].1 = String::new();
    cfg.followers[1].1 = f2.uri_as("repl", FOLLOWER_PW);
    cfg.http_extra = format!("admin_token_file = \"{}\"\n", token_file.display());
    cfg.uri_files.push(("f1".into(), f1_uri_file.clone()));
    let node = Replicator::start_with_env(&cfg, "n1", NODE_ENV);

    let coll = src.coll("data").await;
    for i in 0..50 {
        coll.insert_one(doc! {"dataId": i, "v": i}).await.unwrap();
    }
    coll.update_one(doc! {"dataId": 3}, doc! {"$set": {"v": "changed"}})
        .await
        .unwrap();
    coll.delete_one(doc! {"dataId": 4}).await.unwrap();
    for f in [&f1, &f2] {
        let fc = f.coll("data").await;
        wait_for("the follower converges", Duration::from_secs(60), || {
            let fc = fc.clone();
            async move {
                fc.count_documents(doc! {}).await.unwrap_or(0) == 49
                    && fc
                        .find_one(doc! {"dataId": 3})
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|d| d.get_str("v") == Ok("changed"))
            }
        })
        .await;
    }

    // Everything a user or an operator can see.
    let mut seen = Vec::new();
    let (code, out) = run_check_env(&node.config_path, &[], NODE_ENV);
    assert_eq!(code, 0, "check: {out}");
    seen.push(("check", out));
    // A difference, repaired by check --repair (writes with the follower's own user).
    f2.coll("data")
        .await
        .insert_one(doc! {"dataId": 999, "stray": true})
        .await
        .unwrap();
    let (code, out) = run_check_env(&node.config_path, &["--repair"], NODE_ENV);
    assert_eq!(code, 0, "check --repair: {out}");
    seen.push(("check --repair", out));
    let (code, out) = run_cli("status", &node.config_path, &[], NODE_ENV);
    assert_eq!(code, 0, "status: {out}");
    seen.push(("status", out));
    let http = reqwest::Client::new();
    for path in ["/status", "/metrics", "/sync-check"] {
        let body = http
            .get(node.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen.push((path, body));
    }
    // The mutating endpoint: refused without the token, accepted with it.
    let resp = http.post(node.url("/resync/f2")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http
        .post(node.url("/resync/f2"))
        .bearer_auth("wrong-token-0000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http
        .post(node.url("/resync/f2"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // The CLI sends the token from the config.
    let (code, out) = run_cli("resync", &node.config_path, &["--follower", "f1"], NODE_ENV);
    assert_eq!(code, 0, "resync: {out}");
    seen.push(("resync", out));
    // The copies converge again after both re-copies.
    wait_for(
        "converged after resync",
        Duration::from_secs(60),
        || async { run_check_env(&node.config_path, &[], NODE_ENV).0 == 0 },
    )
    .await;
    // Errors: a follower goes down; its error reaches the status and the log.
    let mut f2 = f2;
    f2.kill();
    wait_for("f2 reported down", Duration::from_secs(60), || async {
        node.status().await.is_some_and(|s| {
            s["followers"][1]["state"] == "down" && s["followers"][1]["last_error"].is_string()
        })
    })
    .await;
    let status = node.status().await.unwrap();
    seen.push(("/status while down", status.to_string()));
    let (code, out) = run_check_env(&node.config_path, &[], NODE_ENV);
    assert_eq!(code, 3, "check with a follower down: {out}");
    seen.push(("check with a follower down", out));
    seen.push(("log", node.log()));

    let secrets = [
        SOURCE_PW,
        SOURCE_PW_ENCODED,
        FOLLOWER_PW,
        TOKEN,
        common::ROOT_PASSWORD,
    ];
    for (what, text) in &seen {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows a secret ({s}):\n{text}");
        }
    }
    // The log did log at debug level (so the test covers the driver's debug output).
    assert!(
        node.log().contains("DEBUG"),
        "the node did not log at debug level"
    );
    // The node's directory holds only its config (with f2's inline password, written by
    // the user) and state: no state file may hold a secret.
    for s in secrets {
        let leaked: Vec<_> = files_containing(node.dir.path(), s)
            .into_iter()
            .filter(|p| p != &node.config_path)
            .collect();
        assert!(leaked.is_empty(), "{s} found in {leaked:?}");
    }
}

/// A wrong password is one clear line that names the deployment and never the password:
/// `run` exits 1 and `check` exits 3, for the source and for a follower.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_one_clear_line_naming_the_deployment() {
    let src = Server::start_with(ServerOpts {
        auth: true,
        ..Default::default()
    })
    .await;
    let f1 = Server::start_with(ServerOpts {
        auth: true,
        ..Default::default()
    })
    .await;
    source_user(&src).await;
    follower_user(&f1).await;
    let wrong = "Wr0ng-Passw0rd-x1";
    for (who, needle) in [("source", "the source"), ("follower", "follower `f1`")] {
        let mut cfg = ConfigBuilder::new(&src, &[&f1]);
        cfg.source = src.uri_as(
            "repl",
            if who == "source" {
                wrong
            } else {
                SOURCE_PW_ENCODED
            },
        );
        cfg.followers[0].1 = f1.uri_as(
            "repl",
            if who == "follower" {
                wrong
            } else {
                FOLLOWER_PW
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();

        let started = Instant::now();
        let (code, out) = cli("run", &path);
        assert_eq!(code, 1, "{who}: run: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{who}: run took {:?}",
            started.elapsed()
        );
        let error_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error_lines.len(), 1, "{who}: {out}");
        assert!(
            error_lines[0].contains(&format!("authentication to {needle}")),
            "{who}: {out}"
        );
        // The server's own reason, from the driver's error chain.
        assert!(
            error_lines[0].contains("AuthenticationFailed (code 18)"),
            "{who}: {out}"
        );
        assert!(!out.contains(wrong), "{who}: the password shows: {out}");
        assert!(
            !error_lines[0].contains("labels") && !error_lines[0].contains("Some(Error"),
            "{who}: the driver's internals show: {out}"
        );

        let (code, out) = run_check(&path, &[]);
        assert_eq!(code, 3, "{who}: check: {out}");
        assert!(out.contains("uthentication"), "{who}: check: {out}");
        assert!(!out.contains(wrong), "{who}: the password shows: {out}");
    }
}

/// A server whose certificate the replicator does not trust is refused with a message that
/// says so; TLS options that skip verification draw a warning.
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_is_refused_clearly_and_insecure_options_warn() {
    let ca = TestCa::generate();
    let other = TestCa::generate();
    let src = Server::start_with(ServerOpts {
        tls: Some(ca.server_tls(false)),
        ..Default::default()
    })
    .await;
    let f1 = Server::start().await;
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.source = src.uri().replace(
        &ca.path("ca.pem").display().to_string(),
        &other.path("ca.pem").display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();
    let (code, out) = run_check(&path, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    let (code, out) = cli("run", &path);
    assert_eq!(code, 1, "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");

    // tlsInsecure connects, with a warning.
    cfg.source = format!("{}&tlsInsecure=true", cfg.source);
    std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();
    let (code, out) = run_check(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("does not verify"), "{out}");
}

/// An unset `${NAME}` in a URI is a config error (exit 2) that names the variable.
#[tokio::test(flavor = "multi_thread")]
async fn an_unset_environment_variable_is_named() {
    let src = Server::start().await;
    let f1 = Server::start().await;
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.followers[0].1 = "mongodb://repl:${MR_TEST_NOT_SET_ANYWHERE}@127.0.0.1:1/".into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();
    for cmd in ["run", "check", "status"] {
        let (code, out) = cli(cmd, &path);
        assert_eq!(code, 2, "{cmd}: {out}");
        assert!(out.contains("MR_TEST_NOT_SET_ANYWHERE"), "{cmd}: {out}");
        assert!(out.contains("followers[0].uri"), "{cmd}: {out}");
    }
}

/// Without a token, a listener that is not on loopback refuses mutating requests (403);
/// read-only endpoints stay open.
#[tokio::test(flavor = "multi_thread")]
async fn a_non_loopback_listener_without_a_token_refuses_mutations() {
    let src = Server::start().await;
    let f1 = Server::start().await;
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.http_host = "0.0.0.0".into();
    let node = Replicator::start(&cfg, "n1");
    node.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(node.post("/resync/f1").await, 403);
    for path in ["/healthz", "/status", "/metrics", "/sync-check"] {
        let code = reqwest::get(node.url(path))
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(code == 200, "{path}: {code}");
    }
    // On loopback without a token, the same request is accepted (the local operator).
    let mut local = ConfigBuilder::new(&src, &[&f1]);
    local.http_host = "127.0.0.1".into();
    let node2 = Replicator::start(&local, "n2");
    wait_for("n2 answers", Duration::from_secs(30), || async {
        node2.status().await.is_some()
    })
    .await;
    // n2 is standby (n1 leads): the request passes the guard and is answered 409.
    assert_eq!(node2.post("/resync/f1").await, 409);
}

/// The HTTP server bounds what clients can hold: a connection that sends nothing (or is
/// idle between requests) is closed after the header-read timeout, and connections beyond
/// the limit are closed at once, while the node keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn slow_idle_and_excess_http_clients_are_cut_off() {
    let src = Server::start().await;
    let f1 = Server::start().await;
    let node = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    node.wait_streaming(Duration::from_secs(60)).await;
    let addr = format!("127.0.0.1:{}", node.http_port);

    // A slow client: half a request head, then nothing.
    let started = Instant::now();
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = slow.read(&mut buf).unwrap_or(0);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "a slow client held its connection for {took:?}"
    );
    // Closed, possibly after a 408 answer.
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.contains("408"), "{answer}");

    // More connections than the limit: the extra ones are closed at once.
    let held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut extra = TcpStream::connect(&addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let n = extra.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a connection beyond the limit was served");
    drop(held);
    wait_for(
        "the node answers again",
        Duration::from_secs(10),
        || async {
            reqwest::get(node.url("/healthz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

/// `/sync-check` results are reused for a few seconds (a poller cannot make every server
/// count on every request), and say how old they are.
#[tokio::test(flavor = "multi_thread")]
async fn sync_check_results_are_cached_briefly() {
    let src = Server::start().await;
    let f1 = Server::start().await;
    let node = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    node.wait_streaming(Duration::from_secs(60)).await;
    let get = || async {
        let v: serde_json::Value = reqwest::get(node.url("/sync-check"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v
    };
    let first = get().await;
    assert_eq!(first["collections"][0]["source_count"], 0, "{first}");
    src.coll("data")
        .await
        .insert_one(doc! {"dataId": 1})
        .await
        .unwrap();
    let second = get().await;
    assert_eq!(second["collections"][0]["source_count"], 0, "{second}");
    assert!(second["age_ms"].as_u64().is_some(), "{second}");
    wait_for("a fresh result", Duration::from_secs(20), || async {
        get().await["collections"][0]["source_count"] == 1
    })
    .await;
}

/// `run` as a child for at most `limit`: its exit code (None when it was still running and
/// was killed) and its output.
fn run_for(path: &std::path::Path, limit: Duration) -> (Option<i32>, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(path)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::from(out.reopen().unwrap()))
        .stderr(std::process::Stdio::from(out.reopen().unwrap()))
        .spawn()
        .unwrap();
    let started = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        code,
        std::fs::read_to_string(out.path()).unwrap_or_default(),
    )
}

/// Review: a URI without credentials for a server that requires them passed the startup
/// check (`hello` and `ping` need no login), then the node retried for ever: pipelines on a
/// follower, the lease on the source ("staying standby"). Now `run` stops at once, saying
/// which deployment refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn a_uri_without_credentials_for_an_auth_server_fails_clearly_at_startup() {
    let plain = Server::start().await;
    let secured = Server::start_with(ServerOpts {
        auth: true,
        ..Default::default()
    })
    .await;
    let anonymous = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true",
        secured.port
    );
    for (who, needle) in [("follower", "follower `f1`"), ("source", "the source")] {
        let mut cfg = if who == "follower" {
            ConfigBuilder::new(&plain, &[&secured])
        } else {
            ConfigBuilder::new(&secured, &[&plain])
        };
        if who == "follower" {
            cfg.followers[0].1 = anonymous.clone();
        } else {
            cfg.source = anonymous.clone();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();
        let (code, out) = run_for(&path, Duration::from_secs(30));
        assert_eq!(
            code,
            Some(1),
            "{who}: still running, or another exit:\n{out}"
        );
        let error = out.lines().find(|l| l.starts_with("error:")).unwrap_or("");
        assert!(
            error.contains(needle) && error.contains("refuses the replicator's user"),
            "{who}: {out}"
        );
    }
}

/// A source user that may read the replicated database but not write the lease passes the
/// startup check, then is refused the lease: `run` stops with the reason (it would otherwise
/// stay standby for ever, and nothing would replicate).
#[tokio::test(flavor = "multi_thread")]
async fn a_source_user_refused_the_lease_stops_the_node_with_the_reason() {
    let src = Server::start_with(ServerOpts {
        auth: true,
        ..Default::default()
    })
    .await;
    let f1 = Server::start().await;
    create_user(&src.client().await, "reader", SOURCE_PW, &[("read", "app")]).await;
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.source = src.uri_as("reader", SOURCE_PW_ENCODED);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();
    let (code, out) = run_for(&path, Duration::from_secs(30));
    assert_eq!(code, Some(1), "still running, or another exit:\n{out}");
    let error = out.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(
        error.contains("refuses the replicator's user the lease")
            && error.contains("mongo_replicator.leases")
            && !error.contains(SOURCE_PW),
        "{out}"
    );
}

/// Review: clients that pipeline requests and never read their answers filled the server's
/// send buffers, and hyper waited on those writes for ever, holding every connection slot
/// (and refusing `/healthz`) past every other timeout. A stalled write now ends its
/// connection.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_never_read_cannot_hold_the_http_server() {
    let src = Server::start().await;
    let f1 = Server::start().await;
    let node = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    node.wait_streaming(Duration::from_secs(60)).await;
    let addr = format!("127.0.0.1:{}", node.http_port);
    // Many pipelined requests for a large answer: far more than the socket buffers hold.
    let requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let held: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = s.write_all(&requests);
            s
        })
        .collect();
    // Every slot is taken and stuck on a write; within the write timeout (10 s) plus a
    // margin, the node serves again while those clients still hold their sockets open.
    wait_for(
        "the node answers /healthz",
        Duration::from_secs(40),
        || async {
            let Ok(mut probe) = TcpStream::connect(&addr) else {
                return false;
            };
            let _ = probe.set_read_timeout(Some(Duration::from_secs(2)));
            let _ =
                probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = [0u8; 64];
            probe.read(&mut buf).unwrap_or(0) > 0
        },
    )
    .await;
    drop(held);
}
