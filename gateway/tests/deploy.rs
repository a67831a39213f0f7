//! deploy/ and `gateway tap`, checked with real tools: kubernetes-validate (offline schemas),
//! promtool, a real Prometheus scraping a real gateway under load, and the tap binary reading
//! back what the gateway published to a real broker.
//!
//! Tools come from `scripts/setup-deploy-tools.sh` (Debian `prometheus`, PyPI
//! `kubernetes-validate` in `.cache/deploy-venv`). Docker and a Kubernetes cluster are not
//! available here: the Dockerfile and compose file are checked for consistency, not built or run.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::*;

/// Kubernetes version whose schemas kubernetes-validate ships and the manifests target.
const K8S_VERSION: &str = "1.30.0";

/// Files in deploy/k8s that are not Kubernetes API objects with a built-in schema, and why.
const SCHEMA_EXCEPTIONS: &[(&str, &str)] = &[
    (
        "kustomization.yaml",
        "kustomize configuration, not an API object: checked against the directory listing",
    ),
    (
        "servicemonitor.yaml",
        "prometheus-operator CRD (monitoring.coreos.com/v1): no schema ships offline; checked \
         as YAML for apiVersion, kind and the Service port it scrapes",
    ),
];

fn root() -> PathBuf {
    workspace_root()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}"))
}

/// Runs scripts/setup-deploy-tools.sh once per test binary; returns the venv's bin directory.
fn tools() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/setup-deploy-tools.sh"))
            .output()
            .expect("run setup-deploy-tools.sh");
        assert!(
            out.status.success(),
            "setup-deploy-tools.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn get<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a serde_yaml::Value {
    let mut cur = v;
    for k in path {
        cur = cur
            .get(*k)
            .unwrap_or_else(|| panic!("missing {k} in path {path:?}"));
    }
    cur
}

fn s<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn k8s_manifests_validate_against_offline_schemas() {
    let bin = tools();
    let dir = root().join("deploy/k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    let exceptions: Vec<&str> = SCHEMA_EXCEPTIONS.iter().map(|(f, _)| *f).collect();
    let validated: Vec<&String> = files
        .iter()
        .filter(|f| !exceptions.contains(&f.as_str()))
        .collect();
    assert!(validated.len() >= 7, "too few manifests: {validated:?}");
    let mut cmd = Command::new(bin.join("kubernetes-validate"));
    cmd.args(["-k", K8S_VERSION, "--strict"])
        .args(validated.iter().map(|f| dir.join(f)));
    let out = run_ok(&mut cmd);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Unknown kinds only warn (exit 0): a typo in apiVersion must not pass silently.
    assert!(
        !text.contains("Couldn't find schema") && !text.contains("WARN"),
        "kubernetes-validate could not check everything:\n{text}"
    );
    for f in &validated {
        assert!(
            text.contains(&format!("{f} passed")),
            "{f} not validated:\n{text}"
        );
    }

    // Exception 1: the kustomization lists exactly the other files.
    let k = yaml("deploy/k8s/kustomization.yaml");
    assert_eq!(s(&k, &["kind"]), "Kustomization");
    let listed: BTreeSet<String> = get(&k, &["resources"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = files
        .iter()
        .filter(|f| f.as_str() != "kustomization.yaml")
        .cloned()
        .collect();
    assert_eq!(
        listed, present,
        "kustomization resources vs deploy/k8s files"
    );

    // Exception 2: the ServiceMonitor is well-formed and scrapes the Service's admin port.
    let sm = yaml("deploy/k8s/servicemonitor.yaml");
    assert_eq!(s(&sm, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(s(&sm, &["kind"]), "ServiceMonitor");
    let ep = &get(&sm, &["spec", "endpoints"]).as_sequence().unwrap()[0];
    assert_eq!(s(ep, &["port"]), "admin");
    assert_eq!(s(ep, &["path"]), "/metrics");
    let svc = yaml("deploy/k8s/service.yaml");
    let svc_labels = get(&svc, &["metadata", "labels"]);
    for (k, v) in get(&sm, &["spec", "selector", "matchLabels"])
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            svc_labels.get(k),
            Some(v),
            "ServiceMonitor selector vs Service"
        );
    }
    let ports: Vec<(String, u64)> = get(&svc, &["spec", "ports"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                s(p, &["name"]).to_owned(),
                get(p, &["port"]).as_u64().unwrap(),
            )
        })
        .collect();
    assert!(ports.contains(&("admin".into(), 9090)), "{ports:?}");
    assert!(ports.contains(&("stream".into(), 8080)), "{ports:?}");

    // Offline render with kustomize when kubectl happens to be installed (not required).
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run_ok(Command::new("kubectl").arg("kustomize").arg(&dir));
    } else {
        eprintln!("kubectl not installed: `kubectl kustomize deploy/k8s` not checked");
    }
}

fn duration_secs(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().unwrap();
    match unit {
        "s" | "" => n,
        "m" => n * 60,
        other => panic!("unit {other}"),
    }
}

#[test]
fn k8s_deployment_drains_within_its_grace_period_and_probes_the_admin_port() {
    let d = yaml("deploy/k8s/deployment.yaml");
    let cm = yaml("deploy/k8s/configmap.yaml");
    let pod = get(&d, &["spec", "template", "spec"]);
    let c = &get(pod, &["containers"]).as_sequence().unwrap()[0];
    assert_eq!(s(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    assert_eq!(s(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(s(c, &["readinessProbe", "httpGet", "port"]), "admin");
    let admin = get(c, &["ports"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| s(p, &["name"]) == "admin")
        .expect("admin port");
    assert_eq!(get(admin, &["containerPort"]).as_u64(), Some(9090));
    let pre_stop: u64 = get(c, &["lifecycle", "preStop", "exec", "command"])
        .as_sequence()
        .unwrap()[1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let drain = duration_secs(s(&cm, &["data", "GATEWAY_DRAIN_TIMEOUT"]));
    let flush = duration_secs(s(&cm, &["data", "GATEWAY_FLUSH_TIMEOUT"]));
    let grace = get(pod, &["terminationGracePeriodSeconds"])
        .as_u64()
        .unwrap();
    // preStop + drain + close grace (10 s) + the final flush.
    assert!(
        grace > pre_stop + drain + 10 + flush,
        "grace {grace}s vs preStop {pre_stop}s + drain {drain}s + 10 s + flush {flush}s"
    );
    let res = s(c, &["resources", "requests", "cpu"]);
    assert!(!res.is_empty());
    assert!(read("deploy/k8s/deployment.yaml").contains("from docs/benchmarks.md"));

    let hpa = yaml("deploy/k8s/hpa.yaml");
    let metrics = get(&hpa, &["spec", "metrics"]).as_sequence().unwrap();
    assert!(metrics
        .iter()
        .any(|m| m.get("resource").is_some_and(|r| s(r, &["name"]) == "cpu")));
    assert!(metrics.iter().any(|m| s(m, &["type"]) == "Pods"
        && s(m, &["pods", "metric", "name"]) == "gateway_open_streams"));
}

// ---------------------------------------------------------------------------------------------
// Docker

#[test]
fn compose_file_names_the_documented_services_and_ports() {
    let c = yaml("deploy/docker-compose.yml");
    let services = get(&c, &["services"]);
    let ports = |svc: &str| -> Vec<String> {
        get(services, &[svc, "ports"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect()
    };
    // Kafka: the official image in KRaft mode (no ZooKeeper).
    assert!(s(services, &["kafka", "image"]).starts_with("apache/kafka:"));
    assert!(s(services, &["kafka", "environment", "KAFKA_PROCESS_ROLES"]).contains("controller"));
    assert!(services.get("zookeeper").is_none());
    // Gateway: built from deploy/Dockerfile, pointed at the kafka service.
    assert_eq!(
        s(services, &["gateway", "build", "dockerfile"]),
        "deploy/Dockerfile"
    );
    let context = root()
        .join("deploy")
        .join(s(services, &["gateway", "build", "context"]));
    assert!(context.join("deploy/Dockerfile").is_file());
    let cmd: Vec<&str> = get(services, &["gateway", "command"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let b = cmd
        .iter()
        .position(|a| *a == "--brokers")
        .expect("--brokers");
    assert_eq!(cmd[b + 1], "kafka:9092");
    assert_eq!(ports("gateway"), ["8080:8080", "9090:9090"]);
    assert_eq!(ports("prometheus"), ["9091:9090"]);
    assert_eq!(ports("grafana"), ["3000:3000"]);
    // Every mounted file or directory exists.
    for svc in ["prometheus", "grafana"] {
        for v in get(services, &[svc, "volumes"]).as_sequence().unwrap() {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                root().join("deploy").join(host).exists(),
                "{svc} mounts missing {host}"
            );
        }
    }
    // The Prometheus config scrapes the gateway's admin port by service name.
    let p = yaml("deploy/prometheus/prometheus.yml");
    let targets = format!("{:?}", get(&p, &["scrape_configs"]));
    assert!(targets.contains("gateway:9090"), "{targets}");
    // Grafana's datasource uid is what the dashboard's datasource variable defaults to.
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        s(
            &get(&ds, &["datasources"]).as_sequence().unwrap()[0],
            &["uid"]
        ),
        "prometheus"
    );
    // The ports the operations guide names are the ones the compose file publishes.
    let ops = read("docs/operations.md");
    for port in ["8080", "9090", "9091", "9092", "3000"] {
        assert!(
            ops.contains(port),
            "docs/operations.md does not mention {port}"
        );
    }

    let df = read("deploy/Dockerfile");
    assert!(df.contains(" AS builder"), "multi-stage");
    assert!(df.contains("FROM debian:bookworm-slim"));
    assert!(df.contains("cargo build --release"));
    assert!(df.contains("target/release/gateway"));
    assert!(df.contains("USER 10001"), "non-root user");
    let hc = df
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<String>();
    assert!(hc.contains("/healthz") && hc.contains("9090"), "{hc}");
    assert!(df.contains("EXPOSE 8080 9090"));
}

// ---------------------------------------------------------------------------------------------
// Prometheus rules and config

#[test]
fn promtool_checks_config_rules_and_rule_unit_tests() {
    tools();
    let dir = root().join("deploy/prometheus");
    run_ok(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "config", "prometheus.yml"]),
    );
    run_ok(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "rules", "alerts.yml"]),
    );
    run_ok(
        Command::new("promtool")
            .current_dir(&dir)
            .args(["test", "rules", "alerts.test.yml"]),
    );
}

/// Metric names in PromQL: `gateway_*` and `process_*`.
fn metric_names(exprs: &[String]) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b(?:gateway|process)_[a-z_]+").unwrap();
    exprs
        .iter()
        .flat_map(|e| re.find_iter(e).map(|m| m.as_str().to_owned()))
        .collect()
}

fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/gateway.json"))
            .expect("dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

fn alert_exprs() -> Vec<String> {
    let a = yaml("deploy/prometheus/alerts.yml");
    let mut out = Vec::new();
    for g in get(&a, &["groups"]).as_sequence().unwrap() {
        for r in get(g, &["rules"]).as_sequence().unwrap() {
            out.push(s(r, &["expr"]).to_owned());
        }
    }
    out
}

/// `(name, histogram base)`: histogram series are referenced as `<base>_bucket|_sum|_count`.
fn split_histogram(name: &str) -> (&str, Option<&str>) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return (name, Some(base));
        }
    }
    (name, None)
}

#[test]
fn every_dashboard_and_alert_metric_is_defined_in_metrics_rs() {
    let src = read("gateway/src/metrics.rs");
    let names = metric_names(&[dashboard_exprs(), alert_exprs()].concat());
    assert!(names.len() >= 20, "{names:?}");
    for n in &names {
        if n.starts_with("process_") {
            continue; // the process collector's own names
        }
        let (_, base) = split_histogram(n);
        let defined = base.unwrap_or(n);
        assert!(
            src.contains(&format!("\"{defined}\"")),
            "{n} is not a metric defined in gateway/src/metrics.rs"
        );
        if base.is_some() {
            // Only histograms have _bucket/_sum/_count series.
            assert!(defined.ends_with("_seconds"), "{n}: not a histogram");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus scraping a real gateway

/// A child process killed on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Instant query; returns the number of series in the result (Err on a PromQL error).
fn prom_query(port: u16, q: &str) -> Result<usize, String> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", urlencode(q)))
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{q}: {body}"));
    }
    Ok(v["data"]["result"].as_array().map_or(0, |r| r.len()))
}

/// One both-track stream with a dtmf and a stop, lightly paced.
async fn play_stream(port: u16, n: u64, chunks: u64, audio: Vec<u8>) {
    let stream = sid("MZ", 7000 + n);
    let call = sid("CA", 7000 + n);
    let acct = "AC00000000000000000000000000000009";
    let mut c = connect_path(port, "/stream").await.expect("connect");
    c.send(&connected()).await;
    c.send(&start(
        &stream,
        &call,
        acct,
        &["inbound", "outbound"],
        &[("k", "v")],
    ))
    .await;
    let mut seq = 2;
    for k in 0..chunks {
        for t in ["inbound", "outbound"] {
            let at = (k as usize * 160 + n as usize * 997) % (audio.len() - 160);
            c.send(&media(&stream, seq, t, k + 1, k * 20, &audio[at..at + 160]))
                .await;
            seq += 1;
        }
        if k == 5 {
            c.send(&dtmf(&stream, seq, "5")).await;
            seq += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.send(&stop(&stream, seq, acct, &call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_every_metric_the_dashboard_and_alerts_use() {
    tools();
    let gw = Gateway::start("prom", &[]);
    let dir = std::env::temp_dir().join(format!("deploy-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            gw.admin_port
        ),
    )
    .unwrap();
    let port = free_port();
    let prom = Proc(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let start = Instant::now();
    while !matches!(http_get(port, "/-/ready"), Ok((200, _))) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "prometheus not ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A small load: a few both-track streams with dtmf and a stop each.
    let audio = speech();
    let plays: Vec<_> = (0..4)
        .map(|n| tokio::spawn(play_stream(gw.port, n, 60, audio.clone())))
        .collect();
    for p in plays {
        p.await.unwrap();
    }
    // Deliveries acknowledged, then a few more scrapes so rate() has samples on both sides.
    let start = Instant::now();
    while gw.metric("gateway_frames_delivered_total") < 480.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "frames not delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dash = dashboard_exprs();
    let names = metric_names(&[dash.clone(), alert_exprs()].concat());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<String>;
    loop {
        missing = names
            .iter()
            .filter(|n| prom_query(port, &format!("{n}{{job=\"gateway\"}}")).unwrap_or(0) == 0)
            .cloned()
            .collect();
        let delivered = prom_query(port, "gateway_frames_delivered_total > 0").unwrap_or(0);
        if missing.is_empty() && delivered > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics without data in Prometheus: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every dashboard query is valid PromQL and returns series over this data.
    let mut empty = Vec::new();
    for e in &dash {
        if e.starts_with("label_values(") {
            continue; // Grafana template function, not PromQL
        }
        let q = e
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        match prom_query(port, &q) {
            Ok(0) => empty.push(q),
            Ok(_) => {}
            Err(err) => panic!("dashboard query rejected by Prometheus: {err}"),
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
    // Alert expressions parse (they return nothing while nothing is wrong).
    for e in alert_exprs() {
        prom_query(port, &e).unwrap_or_else(|err| panic!("alert rejected: {err}"));
    }
    // The load is visible: media messages were counted and every frame delivered.
    assert!(
        prom_query(
            port,
            "gateway_messages_received_total{event=\"media\"} >= 480"
        )
        .unwrap()
            > 0
    );
    drop(prom);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// gateway tap

const ACCT: &str = "AC00000000000000000000000000000007";

/// Timestamps (ms) of the chunks sent: 0..400 ms, a gap, then 1000..1200 ms.
fn gap_timestamps() -> Vec<u64> {
    (0..20)
        .map(|k| k * 20)
        .chain((0..10).map(|k| 1000 + k * 20))
        .collect()
}

fn chunk(audio: &[u8], track: &str, i: usize) -> Vec<u8> {
    let base = if track == "outbound" { 16_000 } else { 0 };
    audio[base + i * 160..base + (i + 1) * 160].to_vec()
}

/// Plays `stream` with the gap timestamps on both tracks (and a mark), then stops.
async fn play_with_gap(port: u16, stream: &str, call: &str, audio: &[u8]) -> u64 {
    let mut c = connect_path(port, "/stream").await.expect("connect");
    c.send(&start(stream, call, ACCT, &["inbound", "outbound"], &[]))
        .await;
    let mut seq = 2;
    let mut frames = 0;
    for (i, ts) in gap_timestamps().into_iter().enumerate() {
        for t in ["inbound", "outbound"] {
            c.send(&media(
                stream,
                seq,
                t,
                i as u64 + 1,
                ts,
                &chunk(audio, t, i),
            ))
            .await;
            seq += 1;
            frames += 1;
        }
        if i == 3 {
            c.send(&mark(stream, seq, "m1")).await;
            seq += 1;
        }
    }
    c.send(&stop(stream, seq, ACCT, call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(3)).await;
    frames
}

/// Expected WAV data: PCM of every chunk at `timestamp_ms × 8` samples, zeros in between.
fn expected_pcm(audio: &[u8], track: &str) -> Vec<u8> {
    let ts = gap_timestamps();
    let end = (*ts.last().unwrap() + 20) as usize * 8 * 2;
    let mut out = vec![0u8; end];
    for (i, t) in ts.iter().enumerate() {
        let pcm = ulaw_to_pcm(&chunk(audio, track, i));
        let at = *t as usize * 16;
        out[at..at + pcm.len()].copy_from_slice(&pcm);
    }
    out
}

fn run_tap(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("tap")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gateway tap");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tap did not finish in {timeout:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn check_wav(path: &Path, want: &[u8]) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[0..4], b"RIFF");
    assert_eq!(u32_at(&b, 4) as usize, b.len() - 8, "RIFF size");
    assert_eq!(&b[8..16], b"WAVEfmt ");
    assert_eq!(u32_at(&b, 16), 16, "fmt chunk size");
    assert_eq!(u16_at(&b, 20), 1, "PCM");
    assert_eq!(u16_at(&b, 22), 1, "mono");
    assert_eq!(u32_at(&b, 24), 8000, "sample rate");
    assert_eq!(u32_at(&b, 28), 16000, "byte rate");
    assert_eq!(u16_at(&b, 32), 2, "block align");
    assert_eq!(u16_at(&b, 34), 16, "bits per sample");
    assert_eq!(&b[36..40], b"data");
    assert_eq!(u32_at(&b, 40) as usize, want.len(), "data size");
    assert_eq!(b.len(), 44 + want.len());
    let data = &b[44..];
    // The gap (400..1000 ms) is exact silence.
    assert!(
        data[400 * 16..1000 * 16].iter().all(|&x| x == 0),
        "gap not silent"
    );
    if let Some(i) = data.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{}: first differing byte at {i}", path.display());
    }
}

async fn tap_roundtrip(name: &str, gateway_args: &[&str]) {
    let gw = Gateway::start(name, gateway_args);
    let audio = speech();
    let stream = sid("MZ", 0x7a9);
    let other = sid("MZ", 0x7aa);
    let frames = play_with_gap(gw.port, &stream, &sid("CA", 1), &audio).await
        + play_with_gap(gw.port, &other, &sid("CA", 2), &audio).await;
    let start = Instant::now();
    while gw.metric("gateway_frames_delivered_total") < frames as f64
        || gw.metric("gateway_events_delivered_total") < 6.0
    {
        assert!(start.elapsed() < Duration::from_secs(30), "not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out_dir = std::env::temp_dir().join(format!("tap-{}-{}", std::process::id(), gw.prefix));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = run_tap(
        &[
            "--brokers",
            &gw.brokers,
            "--topic-prefix",
            &gw.prefix,
            "--stream",
            &stream,
            "--out",
            out_dir.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for track in ["inbound", "outbound"] {
        check_wav(
            &out_dir.join(format!("{stream}.{track}.wav")),
            &expected_pcm(&audio, track),
        );
    }
    // Only the selected stream's files.
    let files: BTreeSet<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    // One line per event of that stream: start, mark, the timestamp jump per track, stop.
    let kinds: HashMap<&str, usize> = stdout.lines().fold(HashMap::new(), |mut m, l| {
        let mut f = l.split('\t');
        assert_eq!(f.next(), Some(stream.as_str()), "{l}");
        *m.entry(f.next().unwrap()).or_default() += 1;
        let json: serde_json::Value = serde_json::from_str(f.next().unwrap()).unwrap();
        assert_eq!(json["stream_sid"], stream.as_str());
        m
    });
    assert_eq!(kinds.get("start"), Some(&1), "{stdout}");
    assert_eq!(kinds.get("mark"), Some(&1), "{stdout}");
    assert_eq!(kinds.get("stop"), Some(&1), "{stdout}");
    assert_eq!(kinds.get("sequence_gap"), Some(&2), "{stdout}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_writes_pcm_wavs_placed_by_timestamp_with_silent_gaps() {
    tap_roundtrip("tap-pcm", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_decodes_mulaw_batched_records_to_the_same_pcm() {
    tap_roundtrip(
        "tap-mulaw",
        &["--audio-encoding", "mulaw", "--frames-per-record", "3"],
    )
    .await;
}

#[test]
fn tap_without_topics_fails_cleanly() {
    let dir = std::env::temp_dir().join(format!("tap-none-{}", std::process::id()));
    let out = run_tap(
        &[
            "--brokers",
            &brokers(),
            "--topic-prefix",
            "no-such-prefix",
            "--out",
            dir.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("none of the topics"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_follow_writes_live_audio_with_valid_headers_and_stops_on_sigterm() {
    let gw = Gateway::start("tap-follow", &[]);
    let audio = speech();
    let stream = sid("MZ", 0xf011);
    let out_dir = std::env::temp_dir().join(format!("tap-{}-{}", std::process::id(), gw.prefix));
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut tap = Proc(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["tap", "--follow", "--brokers", &gw.brokers])
            .args([
                "--topic-prefix",
                &gw.prefix,
                "--out",
                out_dir.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gateway tap --follow"),
    );
    // Records produced after the tap started are picked up live.
    tokio::time::sleep(Duration::from_millis(500)).await;
    play_with_gap(gw.port, &stream, &sid("CA", 3), &audio).await;
    let inbound = out_dir.join(format!("{stream}.inbound.wav"));
    let want = expected_pcm(&audio, "inbound");
    let start = Instant::now();
    loop {
        let ok = std::fs::read(&inbound)
            .is_ok_and(|b| b.len() == 44 + want.len() && u32_at(&b, 40) as usize == want.len());
        if ok {
            break;
        }
        assert!(
            tap.0.try_wait().unwrap().is_none(),
            "tap --follow exited early"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "live WAV never complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still following: the header was written while running. Now stop it like Ctrl-C would.
    assert!(tap.0.try_wait().unwrap().is_none());
    unsafe {
        libc::kill(tap.0.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(st) = tap.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tap ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "tap --follow exit status {status:?}");
    let mut stdout = String::new();
    tap.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(stdout.contains(&format!("{stream}\tstart\t")), "{stdout}");
    assert!(stdout.contains(&format!("{stream}\tstop\t")), "{stdout}");
    for track in ["inbound", "outbound"] {
        check_wav(
            &out_dir.join(format!("{stream}.{track}.wav")),
            &expected_pcm(&audio, track),
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}
