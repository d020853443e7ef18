//! The small subcommands that talk to a running node: `status` and `resync`.

use std::process::ExitCode;
use std::time::Duration;

use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::follower::Follower;
use crate::status::StatusReport;

/// The base URL of this config's node (a wildcard listen address is reached on loopback).
pub fn base_url(config: &Config) -> String {
    let listen = config
        .http
        .listen
        .replace("0.0.0.0", "127.0.0.1")
        .replace("[::]", "[::1]");
    format!("http://{listen}")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// `mongo-replicator healthz`: asks the node on `[http] listen` for `/healthz`; exit 0 when
/// it answers 200 within 3 s, 1 otherwise (a container healthcheck that needs no curl).
pub async fn healthz(config: &Config) -> ExitCode {
    let url = format!("{}/healthz", base_url(config));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap_or_default();
    match client.get(&url).send().await {
        Ok(resp) if resp.status().is_success() => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("error: {url} answered {}", resp.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {url}: {}", crate::config::redact(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

pub async fn status(config: &Config, json: bool) -> ExitCode {
    let url = format!("{}/status", base_url(config));
    let resp = match http().get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: no running node answers at {url}: {e}");
            return ExitCode::from(3);
        }
    };
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: reading {url}: {e}");
            return ExitCode::from(3);
        }
    };
    if json {
        println!("{text}");
        return ExitCode::SUCCESS;
    }
    let report: StatusReport = match serde_json::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {url} answered something that is not a status: {e}");
            return ExitCode::from(3);
        }
    };
    print!("{}", render_status(&report));
    ExitCode::SUCCESS
}

fn opt(v: Option<i64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// The status as a readable table.
pub fn render_status(r: &StatusReport) -> String {
    let mut out = format!("node {}  role {}  term {}", r.node_id, r.role, r.term);
    match (&r.lease.holder, r.lease.expires_in_ms) {
        (Some(h), Some(ms)) => out.push_str(&format!(
            "  lease held by {h}, {:.1}s left\n",
            ms as f64 / 1000.0
        )),
        (Some(h), None) => out.push_str(&format!("  lease held by {h}\n")),
        _ => out.push_str("  lease free\n"),
    }
    out.push_str(&format!(
        "{:<16} {:<14} {:>12} {:>10} {:>18} {:>11}  {}\n",
        "FOLLOWER", "STATE", "APPLIED", "LAG_MS", "CHECKPOINT_AGE_MS", "QUARANTINED", "LAST_ERROR"
    ));
    for f in &r.followers {
        let state = serde_json::to_value(f.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<16} {:<14} {:>12} {:>10} {:>18} {:>11}  {}\n",
            f.name,
            state,
            f.applied_events,
            opt(f.lag_ms),
            opt(f.checkpoint_age_ms),
            f.quarantined,
            f.last_error.as_deref().unwrap_or("-")
        ));
        if let Some(c) = &f.initial_sync {
            out.push_str(&format!("  {}\n", progress_line(c)));
        }
    }
    out
}

/// One line of copy progress: a bar, documents and bytes, the rate and the time left.
pub fn progress_line(c: &crate::status::CopyReport) -> String {
    const WIDTH: usize = 24;
    let frac = if c.total == 0 {
        1.0
    } else {
        (c.done as f64 / c.total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * WIDTH as f64).round() as usize;
    let eta = c
        .eta_ms
        .map(|ms| {
            humantime::format_duration(std::time::Duration::from_secs((ms / 1000).max(0) as u64))
                .to_string()
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "initial sync [{}{}] {:>5.1}%  {}/{} docs  {}/{}  {:.0} docs/s  eta {eta}",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        frac * 100.0,
        c.done,
        c.total,
        bytesize::ByteSize::b(c.bytes_done),
        bytesize::ByteSize::b(c.bytes_total),
        c.rate,
    )
}

/// POSTs `path` to the node on `[http] listen` (with the admin token, if any) and prints its
/// answer: the exit code, or `None` when no node listens there (the caller falls back).
async fn post_to_node(config: &Config, path: &str) -> Option<ExitCode> {
    let url = format!("{}{path}", base_url(config));
    let mut req = http().post(&url);
    if let Some(token) = &config.http.admin_token {
        req = req.bearer_auth(token.expose());
    }
    match req.send().await {
        Ok(resp) => {
            let code = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if code.is_success() {
                print!("{text}");
                Some(ExitCode::SUCCESS)
            } else {
                eprint!("error: {text}");
                Some(ExitCode::FAILURE)
            }
        }
        Err(e) if e.is_connect() => None,
        Err(e) => {
            eprintln!("error: {url}: {e}");
            Some(ExitCode::from(3))
        }
    }
}

/// Pauses or resumes a follower through the node on `[http] listen`; with no node running
/// there, records it on the source directly (every node follows it within a second).
pub async fn set_paused(config: &Config, follower: &str, pause: bool) -> ExitCode {
    if config.follower(follower).is_none() {
        eprintln!("error: no follower named `{follower}` in the config");
        return ExitCode::from(2);
    }
    let what = if pause { "pause" } else { "resume" };
    if let Some(code) = post_to_node(config, &format!("/{what}/{follower}")).await {
        return code;
    }
    let run = async {
        let source = crate::source::client(&config.source.uri, "source").await?;
        crate::control::Control::new(&source, config)
            .set_paused(follower, pause, config.node_id())
            .await
    };
    match run.await {
        Ok(()) => {
            println!("no node answered here: recorded on the source that follower `{follower}` is {}; every node follows it within a second", if pause { "paused" } else { "resumed" });
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: could not {what} follower `{follower}`: {}",
                crate::config::redact(&format!("{e:#}"))
            );
            ExitCode::from(3)
        }
    }
}

/// Asks the running leader to resync; with no node running, clears the follower's
/// checkpoints so that the next `run` copies it again.
pub async fn resync(config: &Config, follower: &str) -> ExitCode {
    let Some(fcfg) = config.follower(follower) else {
        eprintln!("error: no follower named `{follower}` in the config");
        return ExitCode::from(2);
    };
    if let Some(code) = post_to_node(config, &format!("/resync/{follower}")).await {
        return code;
    }
    // No node answers here: mark the follower for a copy on the follower itself. The mark
    // is the follower's checkpoint, so whichever node leads (now or later, on any host)
    // copies it: a running leader fails its next checkpoint swap, reloads, and sees it.
    let run = async {
        let f = Follower::new(fcfg, &config.replication, config.node_id()).await?;
        let namespaces = if config.selection().is_literal() {
            config.selection().literal()
        } else {
            let source = crate::source::client(&config.source.uri, "source").await?;
            config.selection().resolve(&source).await.map_err(|e| {
                anyhow::anyhow!(
                    "listing the source's collections: {}",
                    crate::source::describe(&e)
                )
            })?
        };
        for ns in &namespaces {
            f.mark_resync(ns).await?;
        }
        let store = CheckpointStore::open(&config.checkpoint.token_file, config.scope())?;
        for ns in &namespaces {
            store.reset(&config.selection().label(ns), follower);
        }
        store.flush().await?;
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => {
            println!("no node answered here: marked follower `{follower}` for a copy; the leader (now, or the next `mongo-replicator run`) copies it again, then streams");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", crate::config::redact(&format!("{e:#}")));
            ExitCode::from(3)
        }
    }
}
