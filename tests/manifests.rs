//! Every manifest under `manifests/` parses into its real type and back without losing a field
//! (so a misspelled or misplaced field fails here, not at `kubectl apply`): core objects into the
//! k8s-openapi types, pools into our `InferencePool` (and pass the controller's own validation),
//! the gateway's config inside its Secret through the gateway's config loader. Kustomizations
//! list exactly the files beside them, the example pools match the gateway's pools, and every
//! metric the alerts and the dashboard query is one the binaries export. CI also validates the
//! objects against the Kubernetes schemas (`.ci/validate-manifests.py`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use llmctl_pool_controller::crd::InferencePool;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path, ext));
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `doc` as `T` and checks that serializing it gives back the same document.
fn round_trip<T: DeserializeOwned + serde::Serialize>(doc: &Value, name: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert!(
        same(&back, doc),
        "{name}: fields were dropped or changed on parsing (a misspelled or misplaced field?)\n\
         parsed: {back}\nfile:   {doc}"
    );
    typed
}

/// Equal documents, where numbers compare by value (`60` and `60.0` are the same).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Prometheus Operator objects (no k8s-openapi types): the fields we use, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Monitor {
    api_version: String,
    kind: String,
    metadata: Value,
    spec: MonitorSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct MonitorSpec {
    selector: Option<Value>,
    endpoints: Option<Vec<ScrapeEndpoint>>,
    pod_metrics_endpoints: Option<Vec<ScrapeEndpoint>>,
    groups: Option<Vec<RuleGroup>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ScrapeEndpoint {
    port: String,
    path: String,
    interval: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    images: Option<Value>,
    #[serde(default)]
    config_map_generator: Vec<Generator>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Generator {
    name: String,
    files: Vec<String>,
    options: Option<Value>,
}

#[test]
fn every_manifest_parses_into_its_type_without_losing_a_field() {
    let mut kinds = BTreeSet::new();
    let mut pools = Vec::new();
    let mut gateway_config = None;
    let mut queries = Vec::new();
    for path in files(&root(), "yaml") {
        if path.file_name().unwrap() == "kustomization.yaml" {
            continue;
        }
        for doc in documents(&path) {
            let kind = doc["kind"].as_str().unwrap_or("").to_owned();
            let name = format!("{}: {kind}/{}", path.display(), doc["metadata"]["name"]);
            match kind.as_str() {
                "Namespace" => drop(round_trip::<Namespace>(&doc, &name)),
                "ServiceAccount" => drop(round_trip::<ServiceAccount>(&doc, &name)),
                "Role" => drop(round_trip::<Role>(&doc, &name)),
                "RoleBinding" => drop(round_trip::<RoleBinding>(&doc, &name)),
                "Deployment" => drop(round_trip::<Deployment>(&doc, &name)),
                "Service" => drop(round_trip::<Service>(&doc, &name)),
                "PodDisruptionBudget" => drop(round_trip::<PodDisruptionBudget>(&doc, &name)),
                "CustomResourceDefinition" => {
                    drop(round_trip::<CustomResourceDefinition>(&doc, &name))
                }
                "Secret" => {
                    let secret: Secret = round_trip(&doc, &name);
                    if let Some(toml) = secret
                        .string_data
                        .and_then(|d| d.get("gateway.toml").cloned())
                    {
                        gateway_config = Some(toml);
                    }
                }
                "InferencePool" => {
                    let pool: InferencePool = round_trip(&doc, &name);
                    let pool_name = pool.metadata.name.clone().unwrap();
                    pool.spec
                        .scaling(&pool_name)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    pools.push(pool);
                }
                "ServiceMonitor" | "PodMonitor" | "PrometheusRule" => {
                    let m: Monitor = serde_json::from_value(doc.clone())
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(m.api_version, "monitoring.coreos.com/v1", "{name}");
                    for g in m.spec.groups.iter().flatten() {
                        queries.extend(g.rules.iter().map(|r| r.expr.clone()));
                    }
                }
                other => panic!("{name}: no check for kind {other:?}; add one"),
            }
            kinds.insert(kind);
        }
    }
    for wanted in [
        "Deployment",
        "Role",
        "PodDisruptionBudget",
        "InferencePool",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(wanted), "no {wanted} in manifests/");
    }

    // The gateway's config loads with the gateway's own loader, and its pools are the examples.
    let config = llmctl_gateway::config::Config::parse(
        &gateway_config.expect("the gateway Secret"),
        "gateway Secret",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config.controller.is_some(),
        "the in-cluster gateway follows the controller"
    );
    let gateway_pools: BTreeMap<String, Vec<String>> = config
        .pools
        .iter()
        .map(|p| (p.name.clone(), p.models.clone()))
        .collect();
    let example_pools: BTreeMap<String, Vec<String>> = pools
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap(),
                p.spec.served_model_names.clone(),
            )
        })
        .collect();
    assert_eq!(
        gateway_pools, example_pools,
        "the gateway routes to exactly the example pools"
    );

    // Every metric queried exists.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("monitoring/llmctl-dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    queries.push(
        dashboard["templating"]["list"][1]["query"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    let sources = [
        ("gateway", include_str!("../gateway/src/metrics.rs")),
        (
            "controller",
            include_str!("../pool-controller/src/metrics.rs"),
        ),
        (
            "worker",
            include_str!("../inference-worker/src/server/metrics.rs"),
        ),
    ];
    let mut seen = 0;
    for query in &queries {
        for (at, _) in query.match_indices("llmctl_") {
            let metric: String = query[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let (binary, rest) = metric["llmctl_".len()..].split_once('_').unwrap();
            let base = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|s| rest.strip_suffix(s))
                .unwrap_or(rest);
            let source = sources
                .iter()
                .find(|(b, _)| *b == binary)
                .unwrap_or_else(|| panic!("{metric}: no binary {binary}"))
                .1;
            let registered = |n: &str| source.contains(&format!("\"{n}\""));
            assert!(
                registered(rest) || registered(base),
                "{metric} is queried but never registered"
            );
            seen += 1;
        }
    }
    assert!(seen > 20, "only {seen} metric references found");
}

#[test]
fn kustomizations_list_exactly_the_files_beside_them() {
    for path in files(&root(), "yaml") {
        if path.file_name().unwrap() != "kustomization.yaml" {
            continue;
        }
        let dir = path.parent().unwrap();
        let k: Kustomization = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut listed: BTreeSet<String> = k.resources.iter().cloned().collect();
        listed.extend(
            k.config_map_generator
                .iter()
                .flat_map(|g| g.files.iter().cloned()),
        );
        let present: BTreeSet<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "kustomization.yaml")
            .collect();
        assert_eq!(listed, present, "{}", path.display());
    }
}
