//! Operability: the endpoints report the documented fields with the right values, metrics
//! parse as Prometheus exposition, and the config reference stays in step with the code.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use mongodb::bson::doc;

const CONVERGE: Duration = Duration::from_secs(60);

fn follower<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["followers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap()
}

#[tokio::test]
async fn status_shows_lag_rising_while_a_follower_is_down_and_falling_after() {
    let (src, f1, mut f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1, &f2]), "node-1");
    let s = src.coll("data").await;
    wait_for("both streaming", CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            st["followers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["state"] == "streaming")
        })
    })
    .await;
    let st = r.status().await.unwrap();
    assert_eq!(st["node_id"], "node-1");
    assert_eq!(st["role"], "leader");
    assert!(st["term"].as_i64().unwrap() >= 1);
    assert_eq!(st["lease"]["holder"], "node-1");
    assert!(st["lease"]["expires_in_ms"].as_i64().unwrap() > 0);
    for f in st["followers"].as_array().unwrap() {
        for field in [
            "name",
            "state",
            "applied_events",
            "lag_ms",
            "checkpoint_age_ms",
            "last_error",
        ] {
            assert!(f.get(field).is_some(), "missing {field} in {f}");
        }
    }

    f2.kill();
    let writer = Writer::start(s.clone(), "w", 50);
    wait_for("f2 down with its lag rising past 2 s", CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            let f = follower(&st, "f2");
            f["state"] == "down"
                && f["lag_ms"].as_i64().unwrap_or(0) > 2000
                && f["last_error"].as_str().is_some()
        })
    })
    .await;
    let lag_down = follower(&r.status().await.unwrap(), "f2")["lag_ms"]
        .as_i64()
        .unwrap();
    let f1_lag = follower(&r.status().await.unwrap(), "f1")["lag_ms"]
        .as_i64()
        .unwrap_or(i64::MAX);
    assert!(f1_lag < lag_down, "the healthy follower is not held back");
    // The metrics say the same.
    let m = metrics(&r).await;
    let lag_metric = sample(&m, "mongo_replicator_lag_seconds", "f2");
    assert!(lag_metric > 2.0, "lag metric {lag_metric}");
    assert_eq!(sample(&m, "mongo_replicator_follower_up", "f2"), 0.0);

    f2.restart().await;
    let _ = writer.stop().await;
    wait_for(
        "f2 streaming again with its lag fallen",
        CONVERGE,
        || async {
            r.status().await.is_some_and(|st| {
                let f = follower(&st, "f2");
                f["state"] == "streaming" && f["lag_ms"].as_i64().is_some_and(|l| l < 1000)
            })
        },
    )
    .await;
    wait_identical(
        &s,
        &[f1.coll("data").await, f2.coll("data").await],
        CONVERGE,
    )
    .await;
}

async fn metrics(r: &Replicator) -> prometheus_parse::Scrape {
    let text = r.metrics_text().await;
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid exposition")
}

/// The value of a metric's sample for one follower (or the unlabelled one).
fn sample(m: &prometheus_parse::Scrape, name: &str, follower: &str) -> f64 {
    m.samples
        .iter()
        .find(|s| {
            s.metric == name && (follower.is_empty() || s.labels.get("follower") == Some(follower))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} for {follower:?}"))
}

#[tokio::test]
async fn metrics_parse_and_the_role_flips_on_failover() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut nodes = start_nodes(&ConfigBuilder::new(&src, &[&f1]), 2);
    wait_for("one leader", CONVERGE, || async {
        leaders(&nodes).await.len() == 1
    })
    .await;
    let leader = leaders(&nodes).await[0];
    let other = 1 - leader;
    let s = src.coll("data").await;
    for i in 0..10 {
        s.insert_one(doc! {"dataId": format!("m{i}")})
            .await
            .unwrap();
    }
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;

    let m = metrics(&nodes[leader]).await;
    assert_eq!(sample(&m, "mongo_replicator_leader", ""), 1.0);
    let term = sample(&m, "mongo_replicator_term", "");
    assert!(term >= 1.0);
    assert!(sample(&m, "mongo_replicator_applied_events_total", "f1") >= 10.0);
    for family in [
        "mongo_replicator_apply_latency_seconds_count",
        "mongo_replicator_batch_size_count",
        "mongo_replicator_checkpoint_age_seconds",
        "mongo_replicator_initial_sync_running",
    ] {
        assert!(m.samples.iter().any(|s| s.metric == family), "no {family}");
    }
    assert_eq!(
        sample(&metrics(&nodes[other]).await, "mongo_replicator_leader", ""),
        0.0
    );

    nodes[leader].kill9();
    wait_for("the standby becomes leader", CONVERGE, || async {
        nodes[other].role().await.as_deref() == Some("leader")
    })
    .await;
    let m = metrics(&nodes[other]).await;
    assert_eq!(sample(&m, "mongo_replicator_leader", ""), 1.0);
    assert!(sample(&m, "mongo_replicator_term", "") > term);
}

#[tokio::test]
async fn status_command_prints_a_table_and_json() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "node-1");
    wait_for("leader", CONVERGE, || async {
        r.role().await.as_deref() == Some("leader")
    })
    .await;
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&r.config_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("role leader") && text.contains("FOLLOWER") && text.contains("f1"),
        "{text}"
    );
    let out = std::process::Command::new(bin())
        .args(["status", "--json", "--config"])
        .arg(&r.config_path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node_id"], "node-1");
    // /sync-check compares counts.
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "x"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    let resp = reqwest::get(r.url("/sync-check")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["in_sync"], true);
    assert_eq!(v["collections"][0]["source_count"], 1);
    // With no node running, status says so and fails.
    let mut r = r;
    r.terminate().await;
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&r.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test]
async fn resync_recopies_one_follower_while_running() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "node-1");
    let s = src.coll("data").await;
    for i in 0..100 {
        s.insert_one(doc! {"dataId": format!("r{i}")})
            .await
            .unwrap();
    }
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    // Drift that streaming alone would never repair.
    f.delete_many(doc! {"dataId": {"$in": ["r1", "r2"]}})
        .await
        .unwrap();
    f.insert_one(doc! {"dataId": "stray"}).await.unwrap();
    let out = std::process::Command::new(bin())
        .args(["resync", "--follower", "f1", "--config"])
        .arg(&r.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    s.insert_one(doc! {"dataId": "after-resync"}).await.unwrap();
    wait_identical(&s, &[f], CONVERGE).await;
}

/// Every key path of a TOML value (`followers[].name` for arrays of tables).
fn key_paths(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    // A map whose keys are the user's (collection names).
                    toml::Value::Table(_) if k == "key_fields" => {
                        out.insert(p);
                    }
                    toml::Value::Table(_) => key_paths(&p, v, out),
                    toml::Value::Array(a) if a.iter().all(|x| x.is_table()) && !a.is_empty() => {
                        key_paths(&format!("{p}[]"), &a[0], out)
                    }
                    _ => {
                        out.insert(p);
                    }
                }
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[test]
fn the_config_reference_documents_every_key_and_nothing_else() {
    let root = env!("CARGO_MANIFEST_DIR");
    // The keys the code knows: a full config, as the code serialises it.
    let example = std::fs::read_to_string(format!("{root}/config.toml")).unwrap();
    let config = mongo_replicator::config::Config::parse(&example).unwrap();
    let value = toml::Value::try_from(&config).unwrap();
    let mut code_keys = BTreeSet::new();
    key_paths("", &value, &mut code_keys);
    // Keys that are absent unless set (and exclude others, as `uri_file` does `uri`): a
    // variant that sets them.
    let dir = tempfile::tempdir().unwrap();
    let uri_file = dir.path().join("uri");
    std::fs::write(&uri_file, "mongodb://127.0.0.1:27017/?replicaSet=rs0").unwrap();
    let follower_uri_file = dir.path().join("follower-uri");
    std::fs::write(
        &follower_uri_file,
        "mongodb://127.0.0.1:27018/?replicaSet=rs1",
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "0123456789abcdef0123").unwrap();
    let mut optional = toml::Value::try_from(&config).unwrap();
    let set = |v: &mut toml::Value, key: &str, path: &std::path::Path| {
        v.as_table_mut()
            .unwrap()
            .insert(key.into(), toml::Value::String(path.display().to_string()));
    };
    set(&mut optional["source"], "uri_file", &uri_file);
    set(
        &mut optional["followers"][0],
        "uri_file",
        &follower_uri_file,
    );
    set(&mut optional["http"], "admin_token_file", &token_file);
    optional["followers"][0]
        .as_table_mut()
        .unwrap()
        .insert("database".into(), toml::Value::String("mirror".into()));
    let optional = mongo_replicator::config::Config::parse(
        &toml::to_string(&optional)
            .unwrap()
            .replace("uri = \"mongodb://127.0.0.1:27017/?replicaSet=rs0\"\n", "")
            .replace("uri = \"mongodb://127.0.0.1:27018/?replicaSet=rs1\"\n", ""),
    )
    .unwrap();
    key_paths(
        "",
        &toml::Value::try_from(&optional).unwrap(),
        &mut code_keys,
    );
    // The namespace form, which replaces `database` and `collections`.
    let mut spans = toml::Value::try_from(&config).unwrap();
    let src = spans["source"].as_table_mut().unwrap();
    src.remove("database");
    src.remove("collections");
    src.insert(
        "namespaces".into(),
        toml::Value::Array(vec![toml::Value::String("app.*".into())]),
    );
    let spans = mongo_replicator::config::Config::parse(&toml::to_string(&spans).unwrap()).unwrap();
    key_paths("", &toml::Value::try_from(&spans).unwrap(), &mut code_keys);
    // The documented keys: the first column of the README's config reference table.
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let section = readme.split("## Config reference").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    let doc_keys: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert_eq!(
        code_keys, doc_keys,
        "README config reference and code disagree"
    );
    // And the example config itself sets every key.
    let example_value: toml::Value = toml::from_str(&example).unwrap();
    let mut example_keys = BTreeSet::new();
    key_paths("", &example_value, &mut example_keys);
    // (Less the keys that replace others, shown there as comments.)
    let mut shown = code_keys.clone();
    for k in [
        "source.uri_file",
        "followers[].uri_file",
        "http.admin_token_file",
        "source.namespaces",
        "followers[].database",
    ] {
        shown.remove(k);
        assert!(
            example.contains(k.rsplit('.').next().unwrap()),
            "config.toml should mention {k}"
        );
    }
    assert_eq!(example_keys, shown, "config.toml should show every key");
    // The Docker deployment's config is valid too.
    // Its URIs and token are compose secrets: stand-ins here.
    let secrets = tempfile::tempdir().unwrap();
    for (name, content) in [
        (
            "source_uri",
            "mongodb://replicator:pw@mongo1:27017/?replicaSet=rs1",
        ),
        (
            "node_2_uri",
            "mongodb://replicator:pw@mongo2:27017/?replicaSet=rs2",
        ),
        (
            "node_3_uri",
            "mongodb://replicator:pw@mongo3:27017/?replicaSet=rs3",
        ),
        ("admin_token", "0123456789abcdef0123456789abcdef"),
    ] {
        std::fs::write(secrets.path().join(name), content).unwrap();
    }
    let docker = std::fs::read_to_string(format!("{root}/docker/config.toml"))
        .unwrap()
        .replace("/run/secrets/", &format!("{}/", secrets.path().display()));
    let docker = mongo_replicator::config::Config::parse(&docker).unwrap();
    assert!(docker.http.admin_token.is_some());
}

#[tokio::test]
async fn json_logs_and_oplog_headroom_are_reported() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[log]\nformat = \"json\"\n");
    let r = Replicator::start(&cfg, "node-1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "h"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    // The headroom: the oplog window minus the checkpoint's age, known for a leader.
    wait_for("oplog headroom in /status", CONVERGE, || async {
        r.status()
            .await
            .is_some_and(|st| st["followers"][0]["oplog_headroom_ms"].as_i64().is_some())
    })
    .await;
    let m = metrics(&r).await;
    assert!(m
        .samples
        .iter()
        .any(|s| s.metric == "mongo_replicator_oplog_headroom_seconds"));
    assert!(m
        .samples
        .iter()
        .any(|s| s.metric == "mongo_replicator_lag_events"));
    // Every log line is a JSON object.
    let log = r.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3);
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut used = BTreeSet::new();
    for file in [
        "deploy/grafana/mongo-replicator.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("mongo_replicator_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            // Histogram series are named after their family.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string();
            used.insert(family);
        }
    }
    assert!(used.len() >= 10, "{used:?}");

    // A node that replicated something exports every family.
    let (src, f1) = (Server::start().await, Server::start().await);
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "node-1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "m"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    r.wait_streaming(CONVERGE).await;
    // Oplog headroom is measured every few seconds.
    let scrape = || async { r.metrics_text().await };
    wait_for("headroom measured", CONVERGE, || async {
        scrape()
            .await
            .contains("mongo_replicator_oplog_headroom_seconds{")
    })
    .await;
    let text = scrape().await;
    // The check's metrics come from `check --metrics-file` (node_exporter's textfile
    // collector), not from the node.
    let file = r.dir.path().join("check.prom");
    let (code, out) = run_check(&r.config_path, &["--metrics-file", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let text = text + &std::fs::read_to_string(&file).unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alert rules but not exported: {missing:?}"
    );
}

#[tokio::test]
async fn the_healthz_command_reports_the_node_for_container_healthchecks() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "node-1");
    let healthz = |config: &std::path::Path| {
        std::process::Command::new(bin())
            .args(["healthz", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    wait_for("healthz answers", CONVERGE, || async {
        healthz(&r.config_path).status.success()
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&healthz(&r.config_path).stdout).trim(),
        "ok"
    );
    r.terminate().await;
    let out = healthz(&r.config_path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/healthz") && !err.contains("panicked"),
        "{err}"
    );
}
