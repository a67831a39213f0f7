//! deploy/ and `gateway tap`, checked with real tools: kubernetes-validate (offline schemas),
//! promtool, a real Prometheus scraping a real gateway under load, the gateway's own
//! `print-config` fed the manifests' environment, and the tap binary reading back what the
//! gateway published to a real broker.
//!
//! Tools come from `scripts/setup-deploy-tools.sh` (Debian `prometheus`, PyPI
//! `kubernetes-validate` in `.cache/deploy-venv`). Docker and a Kubernetes cluster are not
//! available here: the Dockerfile and compose file are checked for consistency, not built or
//! run, and the manifests are validated and cross-checked, not applied.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;
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

/// Example manifests in deploy/k8s (placeholder values): validated against the schemas like the
/// others, but never kustomization resources, so `kubectl apply -k` cannot apply placeholders.
const EXAMPLE_SUFFIX: &str = ".example.yaml";

/// The close grace between the drain timeout and the final flush (docs/decisions.md, 21).
const CLOSE_GRACE_SECS: u64 = 10;

fn root() -> PathBuf {
    workspace_root()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}"))
}

fn k8s(file: &str) -> serde_yaml::Value {
    yaml(&format!("deploy/k8s/{file}"))
}

/// Every document of a multi-document YAML stream.
fn yaml_docs(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
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

fn seq<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a [serde_yaml::Value] {
    get(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path:?} is not a sequence"))
}

fn u64_at(v: &serde_yaml::Value, path: &[&str]) -> u64 {
    get(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not an unsigned integer"))
}

/// Whether every `key: value` of `selector` (a label map) is among `labels`.
fn selects(selector: &serde_yaml::Value, labels: &serde_yaml::Value) -> bool {
    selector
        .as_mapping()
        .expect("label selector map")
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
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

/// A Kubernetes quantity in bytes (`10Gi`, `512Mi`, `8G`, `1000`).
fn quantity_bytes(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        other => panic!("quantity unit {other} in {q}"),
    };
    n * mult
}

/// Every `GATEWAY_*` name written in `text` (comments included: a commented example with a
/// typo would mislead whoever uncomments it).
fn gateway_env_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bGATEWAY_[A-Z0-9_]*[A-Z0-9]\b").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// The `GATEWAY_*` names the gateway binary knows (its `--help` lists each flag's variable,
/// and `GATEWAY_KAFKA_OPTIONS` in the text).
fn known_env_names() -> BTreeSet<String> {
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_gateway")).arg("--help"));
    gateway_env_names(&String::from_utf8_lossy(&out.stdout))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn statefulset() -> serde_yaml::Value {
    let sts = k8s("statefulset.yaml");
    assert_eq!(s(&sts, &["apiVersion"]), "apps/v1");
    assert_eq!(s(&sts, &["kind"]), "StatefulSet");
    sts
}

fn pod_spec(sts: &serde_yaml::Value) -> &serde_yaml::Value {
    get(sts, &["spec", "template", "spec"])
}

/// The gateway container.
fn gateway_container(sts: &serde_yaml::Value) -> &serde_yaml::Value {
    let containers = seq(pod_spec(sts), &["containers"]);
    assert_eq!(containers.len(), 1, "one container per pod");
    assert_eq!(s(&containers[0], &["name"]), "gateway");
    &containers[0]
}

/// Where a pod's environment variable comes from.
#[derive(Debug, Clone, PartialEq)]
enum EnvValue {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath`.
    Field(String),
    /// `valueFrom.secretKeyRef`: (Secret, key, optional).
    Secret(String, String, bool),
}

/// The gateway container's environment as the kubelet builds it: the ConfigMap of `envFrom`
/// (configmap.yaml) overridden by the container's own `env`.
fn pod_env(sts: &serde_yaml::Value) -> BTreeMap<String, EnvValue> {
    let c = gateway_container(sts);
    let cm = k8s("configmap.yaml");
    let env_from = seq(c, &["envFrom"]);
    assert_eq!(env_from.len(), 1);
    assert_eq!(
        s(&env_from[0], &["configMapRef", "name"]),
        s(&cm, &["metadata", "name"]),
        "envFrom names the ConfigMap of configmap.yaml"
    );
    let mut env: BTreeMap<String, EnvValue> = get(&cm, &["data"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap value of {k:?} is not a string"));
            (
                k.as_str().unwrap().to_owned(),
                EnvValue::Literal(v.to_owned()),
            )
        })
        .collect();
    for e in seq(c, &["env"]) {
        let name = s(e, &["name"]).to_owned();
        let value = if let Some(v) = e.get("value") {
            EnvValue::Literal(v.as_str().expect("env value is a string").to_owned())
        } else if let Some(f) = e.get("valueFrom").and_then(|v| v.get("fieldRef")) {
            EnvValue::Field(s(f, &["fieldPath"]).to_owned())
        } else if let Some(r) = e.get("valueFrom").and_then(|v| v.get("secretKeyRef")) {
            EnvValue::Secret(
                s(r, &["name"]).to_owned(),
                s(r, &["key"]).to_owned(),
                r.get("optional").and_then(|o| o.as_bool()).unwrap_or(false),
            )
        } else {
            panic!("env {name}: unsupported source {e:?}");
        };
        env.insert(name, value);
    }
    env
}

fn literal<'a>(env: &'a BTreeMap<String, EnvValue>, name: &str) -> &'a str {
    match env.get(name) {
        Some(EnvValue::Literal(v)) => v,
        other => panic!("{name} must be set to a literal in the pod environment, is {other:?}"),
    }
}

/// The `# GATEWAY_X: "value"` examples commented out in configmap.yaml.
fn commented_examples() -> BTreeMap<String, String> {
    let re = regex::Regex::new(r#"(?m)^\s*#\s*(GATEWAY_[A-Z0-9_]+):\s*"([^"]*)"\s*$"#).unwrap();
    re.captures_iter(&read("deploy/k8s/configmap.yaml"))
        .map(|c| (c[1].to_owned(), c[2].to_owned()))
        .collect()
}

/// The example Secret for the Kafka client settings (kafka-credentials.example.yaml).
fn kafka_secret_example() -> serde_yaml::Value {
    k8s(&format!("kafka-credentials{EXAMPLE_SUFFIX}"))
}

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
    assert!(validated.len() >= 9, "too few manifests: {validated:?}");
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

    // Exception 1: the kustomization lists exactly the other files, examples excepted.
    let k = k8s("kustomization.yaml");
    assert_eq!(s(&k, &["kind"]), "Kustomization");
    let listed: BTreeSet<String> = seq(&k, &["resources"])
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = files
        .iter()
        .filter(|f| f.as_str() != "kustomization.yaml" && !f.ends_with(EXAMPLE_SUFFIX))
        .cloned()
        .collect();
    assert_eq!(
        listed, present,
        "kustomization resources vs deploy/k8s files"
    );
    assert!(
        files.iter().any(|f| f.ends_with(EXAMPLE_SUFFIX)),
        "the example Secret is missing"
    );

    // Exception 2: the ServiceMonitor is well-formed and scrapes the admin port of exactly one
    // Service (the client-facing one, not the headless one: each pod scraped once).
    let sm = k8s("servicemonitor.yaml");
    assert_eq!(s(&sm, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(s(&sm, &["kind"]), "ServiceMonitor");
    let ep = &seq(&sm, &["spec", "endpoints"])[0];
    assert_eq!(s(ep, &["port"]), "admin");
    assert_eq!(s(ep, &["path"]), "/metrics");
    let services: Vec<serde_yaml::Value> = files
        .iter()
        .map(|f| k8s(f))
        .filter(|v| v.get("kind").and_then(|k| k.as_str()) == Some("Service"))
        .collect();
    assert_eq!(services.len(), 2, "client-facing and headless Services");
    let scraped: Vec<&serde_yaml::Value> = services
        .iter()
        .filter(|svc| {
            selects(
                get(&sm, &["spec", "selector", "matchLabels"]),
                get(svc, &["metadata", "labels"]),
            )
        })
        .collect();
    assert_eq!(
        scraped.len(),
        1,
        "ServiceMonitor must select exactly one Service"
    );
    let svc = scraped[0];
    assert_eq!(s(svc, &["metadata", "name"]), "gateway");
    assert!(
        svc["spec"].get("clusterIP").is_none(),
        "not the headless one"
    );
    let ports: Vec<(String, u64)> = seq(svc, &["spec", "ports"])
        .iter()
        .map(|p| (s(p, &["name"]).to_owned(), u64_at(p, &["port"])))
        .collect();
    assert!(ports.contains(&("admin".into(), 9090)), "{ports:?}");
    assert!(ports.contains(&("stream".into(), 8080)), "{ports:?}");
    // The Ingress sends Twilio to that Service's stream port.
    let ing = k8s("ingress.yaml");
    let backend = get(
        &seq(&seq(&ing, &["spec", "rules"])[0], &["http", "paths"])[0],
        &["backend", "service"],
    );
    assert_eq!(s(backend, &["name"]), "gateway");
    assert_eq!(s(backend, &["port", "name"]), "stream");

    // Offline render with kustomize when kubectl happens to be installed (not required): it
    // builds, everything lands in the namespace, and no Secret (placeholders) is in it.
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let out = run_ok(Command::new("kubectl").arg("kustomize").arg(&dir));
        let docs = yaml_docs(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(docs.len(), listed.len(), "one object per resource file");
        for d in &docs {
            let kind = s(d, &["kind"]);
            assert_ne!(
                kind, "Secret",
                "kustomize output must not carry placeholder Secrets"
            );
            if kind != "Namespace" {
                assert_eq!(s(d, &["metadata", "namespace"]), "twilio-gateway", "{kind}");
            }
        }
    } else {
        eprintln!("kubectl not installed: `kubectl kustomize deploy/k8s` not checked");
    }
}

#[test]
fn k8s_statefulset_drains_within_its_grace_period_and_probes_the_admin_port() {
    let sts = statefulset();
    let pod = pod_spec(&sts);
    let c = gateway_container(&sts);
    let env = pod_env(&sts);
    assert_eq!(s(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    assert_eq!(s(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(s(c, &["readinessProbe", "httpGet", "port"]), "admin");
    assert_eq!(s(c, &["livenessProbe", "httpGet", "port"]), "admin");
    let admin = seq(c, &["ports"])
        .iter()
        .find(|p| s(p, &["name"]) == "admin")
        .expect("admin port");
    assert_eq!(u64_at(admin, &["containerPort"]), 9090);
    assert_eq!(literal(&env, "GATEWAY_ADMIN_LISTEN"), "0.0.0.0:9090");
    let stream = seq(c, &["ports"])
        .iter()
        .find(|p| s(p, &["name"]) == "stream")
        .expect("stream port");
    assert_eq!(u64_at(stream, &["containerPort"]), 8080);
    assert_eq!(literal(&env, "GATEWAY_LISTEN"), "0.0.0.0:8080");

    // SIGTERM → drain → 10 s close grace → final flush, all after the preStop sleep and inside
    // the grace period (docs/decisions.md, 21).
    let pre_stop_cmd = seq(c, &["lifecycle", "preStop", "exec", "command"]);
    assert_eq!(pre_stop_cmd[0].as_str(), Some("sleep"));
    let pre_stop: u64 = pre_stop_cmd[1].as_str().unwrap().parse().unwrap();
    let drain = duration_secs(literal(&env, "GATEWAY_DRAIN_TIMEOUT"));
    let flush = duration_secs(literal(&env, "GATEWAY_FLUSH_TIMEOUT"));
    let grace = u64_at(pod, &["terminationGracePeriodSeconds"]);
    assert!(
        grace > pre_stop + drain + CLOSE_GRACE_SECS + flush,
        "grace {grace}s vs preStop {pre_stop}s + drain {drain}s + {CLOSE_GRACE_SECS} s + flush {flush}s"
    );
    // The comment beside the grace period states the same sum.
    let expected_sum = pre_stop + drain + CLOSE_GRACE_SECS + flush;
    assert!(
        read("deploy/k8s/statefulset.yaml").contains(&format!("= {expected_sum} s")),
        "statefulset.yaml's grace-period comment does not add up to {expected_sum} s"
    );
    // Rolling updates replace one pod at a time and wait for it to be ready.
    assert_eq!(
        s(&sts, &["spec", "updateStrategy", "type"]),
        "RollingUpdate"
    );
    assert!(
        get(&sts, &["spec", "updateStrategy"])
            .get("rollingUpdate")
            .and_then(|r| r.get("maxUnavailable"))
            .is_none(),
        "maxUnavailable for StatefulSets is an alpha feature: one pod at a time"
    );
    assert!(u64_at(&sts, &["spec", "minReadySeconds"]) > 0);

    let res = s(c, &["resources", "requests", "cpu"]);
    assert!(!res.is_empty());
    assert!(read("deploy/k8s/statefulset.yaml").contains("from docs/benchmarks.md"));
    assert!(
        get(c, &["resources", "limits"]).get("cpu").is_none(),
        "no CPU limit (throttling delays real-time audio)"
    );

    let hpa = k8s("hpa.yaml");
    let metrics = seq(&hpa, &["spec", "metrics"]);
    assert!(metrics
        .iter()
        .any(|m| m.get("resource").is_some_and(|r| s(r, &["name"]) == "cpu")));
    assert!(metrics.iter().any(|m| s(m, &["type"]) == "Pods"
        && s(m, &["pods", "metric", "name"]) == "gateway_open_streams"));
}

#[test]
fn k8s_statefulset_names_pods_for_playback_slices_and_scales_within_them() {
    let sts = statefulset();
    let env = pod_env(&sts);
    let pod_labels = get(&sts, &["spec", "template", "metadata", "labels"]);
    assert!(selects(
        get(&sts, &["spec", "selector", "matchLabels"]),
        pod_labels
    ));
    // Stable pod names come from the governing headless Service.
    let headless = k8s("headless-service.yaml");
    assert_eq!(
        s(&sts, &["spec", "serviceName"]),
        s(&headless, &["metadata", "name"])
    );
    assert_eq!(s(&headless, &["spec", "clusterIP"]), "None");
    assert!(selects(get(&headless, &["spec", "selector"]), pod_labels));
    // Both Services and the PDB select the StatefulSet's pods.
    let svc = k8s("service.yaml");
    assert!(selects(get(&svc, &["spec", "selector"]), pod_labels));
    let pdb = k8s("pdb.yaml");
    assert!(selects(
        get(&pdb, &["spec", "selector", "matchLabels"]),
        pod_labels
    ));
    assert_eq!(u64_at(&pdb, &["spec", "maxUnavailable"]), 1);
    // Pods start and stop in parallel when scaling.
    assert_eq!(s(&sts, &["spec", "podManagementPolicy"]), "Parallel");

    // Playback slices: the ordinal picks partitions p % count == ordinal; the HPA can create
    // ordinals 0..maxReplicas-1, so count == maxReplicas gives each pod its own slice, and the
    // playback topic needs at least count partitions.
    assert_eq!(literal(&env, "GATEWAY_INSTANCE_INDEX"), "auto");
    let count: u64 = literal(&env, "GATEWAY_INSTANCE_COUNT").parse().unwrap();
    let partitions: u64 = literal(&env, "GATEWAY_TOPIC_PARTITIONS").parse().unwrap();
    assert!(
        !env.contains_key("GATEWAY_PLAYBACK_PARTITIONS"),
        "an explicit partition list excludes --instance-index/--instance-count"
    );
    let hpa = k8s("hpa.yaml");
    let target = get(&hpa, &["spec", "scaleTargetRef"]);
    assert_eq!(s(target, &["apiVersion"]), "apps/v1");
    assert_eq!(s(target, &["kind"]), "StatefulSet");
    assert_eq!(s(target, &["name"]), s(&sts, &["metadata", "name"]));
    let max = u64_at(&hpa, &["spec", "maxReplicas"]);
    let min = u64_at(&hpa, &["spec", "minReplicas"]);
    assert_eq!(count, max, "GATEWAY_INSTANCE_COUNT == HPA maxReplicas");
    assert!(
        count <= partitions,
        "GATEWAY_INSTANCE_COUNT {count} > GATEWAY_TOPIC_PARTITIONS {partitions}"
    );
    let replicas = u64_at(&sts, &["spec", "replicas"]);
    assert!(
        min <= replicas && replicas <= max,
        "{min} <= {replicas} <= {max}"
    );
    assert!(
        min >= 2,
        "at least two pods so a rolling update keeps taking calls"
    );
    // The pod name is the instance id in every record.
    assert_eq!(
        env.get("GATEWAY_ID"),
        Some(&EnvValue::Field("metadata.name".into()))
    );
}

#[test]
fn k8s_spool_volume_per_pod_is_sized_above_the_spool_and_writable_by_the_gateway() {
    let sts = statefulset();
    let env = pod_env(&sts);
    let pod = pod_spec(&sts);
    let c = gateway_container(&sts);
    let spool_dir = literal(&env, "GATEWAY_SPOOL_DIR");
    let mount = seq(c, &["volumeMounts"])
        .iter()
        .find(|m| s(m, &["mountPath"]) == spool_dir)
        .unwrap_or_else(|| panic!("nothing mounted at GATEWAY_SPOOL_DIR {spool_dir}"));
    assert_ne!(
        mount.get("readOnly").and_then(|r| r.as_bool()),
        Some(true),
        "the spool mount is writable"
    );
    let claim = s(mount, &["name"]);
    // The mount is a per-pod claim from volumeClaimTemplates, not a pod volume.
    let pod_volumes: Vec<&str> = pod
        .get("volumes")
        .and_then(|vs| vs.as_sequence())
        .map(|vs| vs.iter().map(|v| s(v, &["name"])).collect())
        .unwrap_or_default();
    assert!(
        !pod_volumes.contains(&claim),
        "the spool must come from volumeClaimTemplates, not the pod volume {claim}"
    );
    let templates = seq(&sts, &["spec", "volumeClaimTemplates"]);
    let pvc = templates
        .iter()
        .find(|t| s(t, &["metadata", "name"]) == claim)
        .unwrap_or_else(|| panic!("no volumeClaimTemplate {claim}"));
    let modes: Vec<&str> = seq(pvc, &["spec", "accessModes"])
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(modes, ["ReadWriteOnce"]);
    // Above the spool's maximum, with room for ext4's 5 % reserved blocks, an open segment
    // and filesystem metadata.
    let size = quantity_bytes(s(pvc, &["spec", "resources", "requests", "storage"]));
    let spool_max: u64 = literal(&env, "GATEWAY_SPOOL_MAX_BYTES").parse().unwrap();
    assert!(
        size as f64 >= spool_max as f64 * 1.15,
        "volume {size} B vs GATEWAY_SPOOL_MAX_BYTES {spool_max} B"
    );
    // Volumes of scaled-away pods may hold undelivered records: kept.
    assert_eq!(
        s(
            &sts,
            &["spec", "persistentVolumeClaimRetentionPolicy", "whenScaled"]
        ),
        "Retain"
    );

    // uid 10001 (the image's user) can write the fresh volume: fsGroup makes it group-owned.
    let df = read("deploy/Dockerfile");
    assert!(df.contains("USER 10001:10001"));
    let sc = get(pod, &["securityContext"]);
    assert_eq!(u64_at(sc, &["runAsUser"]), 10001);
    assert_eq!(u64_at(sc, &["runAsGroup"]), 10001);
    assert_eq!(u64_at(sc, &["fsGroup"]), 10001);
    assert_eq!(get(sc, &["runAsNonRoot"]).as_bool(), Some(true));
    // The root filesystem stays read-only: the spool is the only writable mount.
    assert_eq!(
        get(c, &["securityContext", "readOnlyRootFilesystem"]).as_bool(),
        Some(true)
    );
    for m in seq(c, &["volumeMounts"]) {
        if s(m, &["mountPath"]) != spool_dir {
            assert_eq!(
                m.get("readOnly").and_then(|r| r.as_bool()),
                Some(true),
                "{m:?} should be read-only"
            );
        }
    }
    // Replaying a full spool happens before /healthz answers: the startup probe allows a
    // minute or more.
    let startup = get(c, &["startupProbe"]);
    assert!(u64_at(startup, &["periodSeconds"]) * u64_at(startup, &["failureThreshold"]) >= 60);
}

#[test]
fn k8s_kafka_secret_is_mounted_as_the_options_file() {
    let sts = statefulset();
    let env = pod_env(&sts);
    let pod = pod_spec(&sts);
    let c = gateway_container(&sts);
    let file = Path::new(literal(&env, "GATEWAY_KAFKA_OPTIONS_FILE"));
    let (dir, name) = (
        file.parent().unwrap().to_str().unwrap(),
        file.file_name().unwrap().to_str().unwrap(),
    );
    let mount = seq(c, &["volumeMounts"])
        .iter()
        .find(|m| s(m, &["mountPath"]) == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    assert_eq!(get(mount, &["readOnly"]).as_bool(), Some(true));
    let volume = seq(pod, &["volumes"])
        .iter()
        .find(|v| s(v, &["name"]) == s(mount, &["name"]))
        .expect("the options file's volume");
    // A secret volume, or a projected volume with secret sources: (secret, items, optional).
    let sources: Vec<(&str, &[serde_yaml::Value], bool)> = if let Some(sec) = volume.get("secret") {
        vec![(
            s(sec, &["secretName"]),
            seq(sec, &["items"]),
            sec.get("optional")
                .and_then(|o| o.as_bool())
                .unwrap_or(false),
        )]
    } else {
        seq(volume, &["projected", "sources"])
            .iter()
            .filter_map(|src| src.get("secret"))
            .map(|sec| {
                (
                    s(sec, &["name"]),
                    seq(sec, &["items"]),
                    sec.get("optional")
                        .and_then(|o| o.as_bool())
                        .unwrap_or(false),
                )
            })
            .collect()
    };
    let example = kafka_secret_example();
    assert_eq!(s(&example, &["kind"]), "Secret");
    let secret_name = s(&example, &["metadata", "name"]);
    let (_, items, optional) = sources
        .iter()
        .find(|(n, _, _)| *n == secret_name)
        .unwrap_or_else(|| panic!("volume does not mount Secret {secret_name}: {volume:?}"));
    assert!(
        !optional,
        "without its settings the gateway would connect without security"
    );
    let item = items
        .iter()
        .find(|i| s(i, &["path"]) == name)
        .unwrap_or_else(|| panic!("no item of {secret_name} lands at {name}"));
    let key = s(item, &["key"]);
    let props = s(&example, &["stringData", key]);
    // The example carries SASL/SSL settings with placeholders, clearly marked, never values.
    for line in ["security.protocol=sasl_ssl", "sasl.mechanism=SCRAM-SHA-512"] {
        assert!(props.lines().any(|l| l.trim() == line), "{line} missing");
    }
    for k in ["sasl.username", "sasl.password"] {
        let v = props
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing"));
        assert!(
            v.starts_with("CHANGE-ME"),
            "{k} must be a marked placeholder, is {v:?}"
        );
    }
    assert!(
        read(&format!("deploy/k8s/kafka-credentials{EXAMPLE_SUFFIX}"))
            .contains("PLACEHOLDER VALUES, NOT REAL CREDENTIALS")
    );
    // Every other secret file the volume mounts is optional (e.g. a private CA).
    for (n, _, opt) in &sources {
        assert!(*n == secret_name || *opt, "{n}: a second required Secret");
    }
    // Non-secret settings go in GATEWAY_KAFKA_OPTIONS (set, or shown commented out in
    // configmap.yaml): nothing credential-like there.
    let mut options: Vec<String> = commented_examples()
        .get("GATEWAY_KAFKA_OPTIONS")
        .cloned()
        .into_iter()
        .collect();
    if let Some(EnvValue::Literal(o)) = env.get("GATEWAY_KAFKA_OPTIONS") {
        options.push(o.clone());
    }
    assert!(
        !options.is_empty(),
        "configmap.yaml does not show GATEWAY_KAFKA_OPTIONS"
    );
    for opts in &options {
        for l in opts.lines().filter(|l| !l.trim().is_empty()) {
            let k = l.split('=').next().unwrap().to_lowercase();
            assert!(
                !["password", "secret", "username", "key"]
                    .iter()
                    .any(|w| k.contains(w)),
                "GATEWAY_KAFKA_OPTIONS holds {k}: put it in the Secret"
            );
        }
    }
}

#[test]
fn deploy_files_name_only_settings_the_gateway_knows() {
    let known = known_env_names();
    assert!(
        known.contains("GATEWAY_INSTANCE_INDEX") && known.len() >= 40,
        "{known:?}"
    );
    let mut unknown = Vec::new();
    for f in [
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/statefulset.yaml",
        "deploy/k8s/service.yaml",
        "deploy/k8s/ingress.yaml",
        "deploy/docker-compose.yml",
        "deploy/Dockerfile",
        "docs/operations.md",
    ] {
        for n in gateway_env_names(&read(f)) {
            if known.contains(&n) {
                continue;
            }
            unknown.push(format!("{f}: {n}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "names the gateway does not read: {unknown:#?}"
    );
}

/// `gateway print-config` with `env` (and nothing else), run under the host name `host` when
/// the test may create a UTS namespace (`--instance-index auto` reads the host name); else
/// GATEWAY_INSTANCE_INDEX=auto is replaced by the host name's ordinal, and that is said.
fn print_config(env: &BTreeMap<String, String>, host: &str, args: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_gateway");
    let uts = Command::new("unshare")
        .args(["--uts", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut env = env.clone();
    let mut cmd = if uts {
        let mut c = Command::new("unshare");
        c.args([
            "--uts",
            "sh",
            "-c",
            r#"printf %s "$0" > /proc/sys/kernel/hostname && exec "$@""#,
            host,
            bin,
        ]);
        c
    } else {
        if env.get("GATEWAY_INSTANCE_INDEX").map(String::as_str) == Some("auto") {
            let ordinal = host.rsplit('-').next().unwrap().to_owned();
            eprintln!(
                "unshare --uts not permitted: GATEWAY_INSTANCE_INDEX=auto replaced by {ordinal}"
            );
            env.insert("GATEWAY_INSTANCE_INDEX".into(), ordinal);
        }
        Command::new(bin)
    };
    cmd.args(args).arg("print-config").env_clear().envs(&env);
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("run gateway print-config");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "print-config refused the deployment's settings ({:?}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn k8s_pod_environment_is_accepted_by_the_gateway() {
    let sts = statefulset();
    let hpa = k8s("hpa.yaml");
    let max = u64_at(&hpa, &["spec", "maxReplicas"]);
    // The last pod the HPA can create.
    let pod_name = format!("{}-{}", s(&sts, &["metadata", "name"]), max - 1);
    let tmp = std::env::temp_dir().join(format!("deploy-env-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let example = kafka_secret_example();
    let props = s(&example, &["stringData", "kafka.properties"]);
    let props_path = tmp.join("kafka.properties");
    std::fs::write(&props_path, props).unwrap();

    let mut env = BTreeMap::new();
    for (k, v) in pod_env(&sts) {
        let v = match v {
            EnvValue::Literal(v) => v,
            EnvValue::Field(f) if f == "metadata.name" => pod_name.clone(),
            EnvValue::Field(f) => panic!("{k}: field {f} not simulated"),
            EnvValue::Secret(_, _, true) => continue,
            EnvValue::Secret(secret, key, false) => format!("test-{secret}-{key}"),
        };
        env.insert(k, v);
    }
    // The mounted Secret, at a path that exists here (its wiring: the test above).
    env.insert(
        "GATEWAY_KAFKA_OPTIONS_FILE".into(),
        props_path.to_str().unwrap().into(),
    );
    // The commented examples too: uncommented, they must be valid.
    let examples = commented_examples();
    assert!(
        examples.contains_key("GATEWAY_TRUSTED_PROXIES")
            && examples.contains_key("GATEWAY_ALLOW_CIDRS"),
        "configmap.yaml lost its connection-limit examples: {examples:?}"
    );
    env.extend(examples.clone());

    let out = print_config(&env, &pod_name, &[]);
    let line = |k: &str| -> &str {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("{k} not in print-config:\n{out}"))
    };
    let count = &env["GATEWAY_INSTANCE_COUNT"];
    assert_eq!(line("instance_index"), (max - 1).to_string());
    assert_eq!(line("instance_count"), count.as_str());
    assert_eq!(line("gateway_id"), format!("{pod_name:?}"));
    assert_eq!(line("topic_partitions"), env["GATEWAY_TOPIC_PARTITIONS"]);
    assert_eq!(
        line("drain_timeout"),
        format!(
            "\"{}ms\"",
            duration_secs(&env["GATEWAY_DRAIN_TIMEOUT"]) * 1000
        )
    );
    assert_eq!(
        line("flush_timeout"),
        format!(
            "\"{}ms\"",
            duration_secs(&env["GATEWAY_FLUSH_TIMEOUT"]) * 1000
        )
    );
    assert_eq!(line("create_topics"), env["GATEWAY_CREATE_TOPICS"]);
    for (var, key) in [
        ("GATEWAY_TRUSTED_PROXIES", "trusted_proxy"),
        ("GATEWAY_ALLOW_CIDRS", "allow_cidr"),
    ] {
        for cidr in examples[var].split(',') {
            assert!(
                line(key).contains(&format!("{:?}", cidr.trim())),
                "{key}: {cidr}"
            );
        }
    }
    assert!(out.contains("twilio auth tokens: 1 configured"), "{out}");
    // The Secret's settings and the GATEWAY_KAFKA_OPTIONS example reach the Kafka options; the
    // password never prints.
    for kv in [
        r#""security.protocol" = "sasl_ssl""#,
        r#""sasl.mechanism" = "SCRAM-SHA-512""#,
        r#""sasl.password" = "<redacted>""#,
        r#""linger.ms" = "20""#,
    ] {
        assert!(out.contains(kv), "{kv} not in print-config:\n{out}");
    }
    assert!(!out.contains("CHANGE-ME-kafka-password"));
    // The spool: the directory the volume is mounted at, and its cap.
    assert_eq!(line("spool_dir"), format!("{:?}", env["GATEWAY_SPOOL_DIR"]));
    assert_eq!(line("spool_max_bytes"), env["GATEWAY_SPOOL_MAX_BYTES"]);
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---------------------------------------------------------------------------------------------
// Docker

#[test]
fn compose_file_names_the_documented_services_and_ports() {
    let c = yaml("deploy/docker-compose.yml");
    let services = get(&c, &["services"]);
    let ports = |svc: &str| -> Vec<String> {
        seq(services, &[svc, "ports"])
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
    let cmd: Vec<&str> = seq(services, &["gateway", "command"])
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
        for v in seq(services, &[svc, "volumes"]) {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                root().join("deploy").join(host).exists(),
                "{svc} mounts missing {host}"
            );
        }
    }
    // The gateway's environment, as compose passes it.
    let genv: BTreeMap<String, String> = get(services, &["gateway", "environment"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_yaml::Value::String(s) => s.clone(),
                other => panic!("{k:?}: quote compose environment values, got {other:?}"),
            };
            (k.as_str().unwrap().to_owned(), v)
        })
        .collect();
    // The spool lives on a named volume mounted at GATEWAY_SPOOL_DIR; the image creates that
    // directory owned by 10001, which a fresh named volume copies.
    let spool_dir = &genv["GATEWAY_SPOOL_DIR"];
    let declared = get(&c, &["volumes"])
        .as_mapping()
        .expect("top-level volumes");
    let spool_mount = seq(services, &["gateway", "volumes"])
        .iter()
        .map(|v| v.as_str().unwrap())
        .find(|v| v.split(':').nth(1) == Some(spool_dir.as_str()))
        .unwrap_or_else(|| panic!("nothing mounted at {spool_dir}"));
    let volume = spool_mount.split(':').next().unwrap();
    assert!(
        declared.contains_key(volume),
        "{volume} is not a named volume declared at the top level"
    );
    let df = read("deploy/Dockerfile");
    assert!(
        df.lines()
            .any(|l| l.contains("install -d -o 10001 -g 10001") && l.contains(spool_dir.as_str())),
        "the image does not create {spool_dir} for uid 10001"
    );
    // Stopping waits for the drain, the close grace and the final flush.
    let drain = duration_secs(&genv["GATEWAY_DRAIN_TIMEOUT"]);
    let flush = genv
        .get("GATEWAY_FLUSH_TIMEOUT")
        .map_or(30, |f| duration_secs(f));
    let stop = duration_secs(s(services, &["gateway", "stop_grace_period"]));
    assert!(
        stop > drain + CLOSE_GRACE_SECS + flush,
        "stop_grace_period {stop}s vs drain {drain}s + {CLOSE_GRACE_SECS} s + flush {flush}s"
    );
    // The gateway accepts the compose command line and environment.
    let out = print_config(&genv, "gateway", &cmd);
    assert!(out.contains("brokers = \"kafka:9092\""), "{out}");
    if out.contains("spool_dir") {
        assert!(out.contains(&format!("spool_dir = {spool_dir:?}")), "{out}");
    }
    // The Prometheus config scrapes the gateway's admin port by service name.
    let p = yaml("deploy/prometheus/prometheus.yml");
    let targets = format!("{:?}", get(&p, &["scrape_configs"]));
    assert!(targets.contains("gateway:9090"), "{targets}");
    // Grafana's datasource uid is what the dashboard's datasource variable defaults to.
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(s(&seq(&ds, &["datasources"])[0], &["uid"]), "prometheus");
    // The ports the operations guide names are the ones the compose file publishes.
    let ops = read("docs/operations.md");
    for port in ["8080", "9090", "9091", "9092", "3000"] {
        assert!(
            ops.contains(port),
            "docs/operations.md does not mention {port}"
        );
    }

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

#[test]
fn every_alert_has_a_unit_test_and_a_runbook_section() {
    let ops = read("docs/operations.md");
    let tests = read("deploy/prometheus/alerts.test.yml");
    let a = yaml("deploy/prometheus/alerts.yml");
    let mut names = Vec::new();
    for g in seq(&a, &["groups"]) {
        for r in seq(g, &["rules"]) {
            let name = s(r, &["alert"]);
            names.push(name.to_owned());
            assert_eq!(
                s(r, &["annotations", "runbook"]),
                format!("docs/operations.md#{}", name.to_lowercase()),
                "{name}: runbook link"
            );
            assert!(
                ops.lines().any(|l| l == format!("### {name}")),
                "docs/operations.md has no `### {name}` runbook"
            );
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no promtool unit test in alerts.test.yml"
            );
        }
    }
    assert!(names.len() >= 16, "{names:?}");
}

/// Every file under `dir`, recursively, relative to the workspace root.
fn files_under(dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root().join(dir)];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(root()).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn deploy_references_to_the_operations_guide_name_its_sections() {
    let headings: BTreeSet<String> = read("docs/operations.md")
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(|h| h.trim().to_owned())
        .collect();
    let re = regex::Regex::new(r#"docs/operations\.md, "([^"]+)""#).unwrap();
    let mut found = 0;
    let mut broken = Vec::new();
    for f in files_under("deploy") {
        let Ok(text) = std::fs::read_to_string(root().join(&f)) else {
            continue; // not text
        };
        for c in re.captures_iter(&text) {
            found += 1;
            if !headings.contains(&c[1]) {
                broken.push(format!("{f}: \"{}\"", &c[1]));
            }
        }
    }
    assert!(
        found >= 8,
        "only {found} section references found in deploy/"
    );
    assert!(
        broken.is_empty(),
        "sections docs/operations.md does not have: {broken:#?}\nheadings: {headings:#?}"
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

/// `origin_ms`: the stream time of the WAV's first sample (`--from-ms`).
fn check_wav(path: &Path, want: &[u8], origin_ms: usize) {
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
        data[(400 - origin_ms) * 16..(1000 - origin_ms) * 16]
            .iter()
            .all(|&x| x == 0),
        "gap not silent"
    );
    if let Some(i) = data.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{}: first differing byte at {i}", path.display());
    }
}

/// `range`: `--from-ms`/`--to-ms` for the tap (the WAVs then start at `from`).
async fn tap_roundtrip(name: &str, gateway_args: &[&str], range: Option<(u64, u64)>) {
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
    let (from, to) = range.map_or((String::new(), String::new()), |(f, t)| {
        (f.to_string(), t.to_string())
    });
    let mut args = vec![
        "--brokers",
        &gw.brokers,
        "--topic-prefix",
        &gw.prefix,
        "--stream",
        &stream,
        "--out",
        out_dir.to_str().unwrap(),
    ];
    if range.is_some() {
        args.extend(["--from-ms", &from, "--to-ms", &to]);
    }
    let out = run_tap(&args, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tap failed: {stderr}");
    // The stream has ended: the tap reads only its ranges, from its terminal event's index.
    assert!(
        stderr.contains(&format!("replay index of {stream}")),
        "{stderr}"
    );
    for track in ["inbound", "outbound"] {
        let full = expected_pcm(&audio, track);
        let want = match range {
            // 8 samples of 2 bytes per ms.
            Some((f, t)) => full[(f as usize * 16)..(t as usize * 16).min(full.len())].to_vec(),
            None => full,
        };
        let origin = range.map_or(0, |(f, _)| f as usize);
        check_wav(
            &out_dir.join(format!("{stream}.{track}.wav")),
            &want,
            origin,
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
    tap_roundtrip("tap-pcm", &[], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_decodes_mulaw_batched_records_to_the_same_pcm() {
    tap_roundtrip(
        "tap-mulaw",
        &["--audio-encoding", "mulaw", "--frames-per-record", "3"],
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_cuts_a_window_of_the_stream_timeline_mid_record() {
    // 110 ms falls inside a 3-chunk record (60 ms); 1100 ms inside the gap-separated tail.
    tap_roundtrip(
        "tap-window",
        &["--audio-encoding", "mulaw", "--frames-per-record", "3"],
        Some((110, 1100)),
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
            0,
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}
