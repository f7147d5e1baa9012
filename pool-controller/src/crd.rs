//! The `InferencePool` custom resource (`llmctl.io/v1alpha1`, namespaced): the Kubernetes form
//! of a pool spec. `spec` names the model, the runtime (our worker, or any OpenAI-compatible
//! engine image such as vLLM), the executor pod template and the scaling parameters of the local
//! spec file (validated by the same code, [`crate::spec::scaling`]); `status` reports executors
//! by class and phase, the last decision and its reason, and conditions. `crdgen` writes the
//! CRD to `manifests/base/crd.yaml`; a test keeps the committed file in sync.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::autoscaler::ScalingSpec;
use crate::spec::{ScalingFields, SpecError};

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "llmctl.io",
    version = "v1alpha1",
    kind = "InferencePool",
    namespaced,
    status = "InferencePoolStatus",
    shortname = "ipool",
    category = "llmctl",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Warm","type":"integer","jsonPath":".status.warm"}"#,
    printcolumn = r#"{"name":"Ephemeral","type":"integer","jsonPath":".status.ephemeral"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desired"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.lastReason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// The model this pool serves (a Hugging Face folder name or id, as the runtime takes it).
    pub model: String,
    /// Model names clients send (default: the pool's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served_model_names: Vec<String>,
    /// Which engine the executor image runs.
    #[serde(default)]
    pub runtime: Runtime,
    pub executor: ExecutorTemplate,
    #[serde(default)]
    pub scaling: PoolScaling,
}

/// The engine inside an executor pod.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Runtime {
    /// `llmctl worker` (readiness: `GET /health`).
    #[default]
    Llmctl,
    /// Any OpenAI-compatible server image, e.g. vLLM (readiness: `GET /v1/models`).
    OpenAiCompatible,
}

/// How executor pods are built.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorTemplate {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Container resources, e.g. `limits: {nvidia.com/gpu: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Volumes for model weights (a PVC, a hostPath cache, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// The port the engine serves HTTP on (default 8000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Concurrent requests a gateway sends one executor at most (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Pod creation to ready, at most (default 600 s: image pulls and weight loads are slow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_secs: Option<u64>,
    /// Pod termination grace when an executor is drained (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_grace_secs: Option<u64>,
}

/// The scaling parameters of the local pool spec, in Kubernetes' camelCase.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolScaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_warm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_concurrency: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_window_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_window_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scale_up_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scale_down_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ttl_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal_ttl_secs: Option<f64>,
    /// Share of an executor's token throughput and KV cache the token signals plan to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_utilization: Option<f64>,
    /// Extrapolate rising load over the observed cold start (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookahead: Option<bool>,
    /// One executor's prefill throughput (token signals; with the two below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_prefill_tokens_per_s: Option<f64>,
    /// One executor's decode throughput when loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_decode_tokens_per_s: Option<f64>,
    /// Tokens one executor's KV cache holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_kv_tokens: Option<f64>,
}

/// What the controller reports on the resource (written with server-side apply).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    /// Live warm executors (starting or ready).
    pub warm: u32,
    /// Live ephemeral executors (starting or ready).
    pub ephemeral: u32,
    pub ready: u32,
    pub starting: u32,
    pub draining: u32,
    /// Warm plus ephemeral executors the autoscaler wants.
    pub desired: u32,
    /// Executors by class and phase.
    #[serde(default)]
    pub classes: ClassCounts,
    /// The autoscaler's latest decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<Decision>,
    /// The latest decision's reason (also in `lastDecision`; a printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Live executors of each class by phase.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClassCounts {
    pub warm: PhaseCounts,
    pub ephemeral: PhaseCounts,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseCounts {
    pub starting: u32,
    pub ready: u32,
    pub draining: u32,
}

/// One autoscaler decision: the targets it set, why, and since when they hold.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub desired_warm: u32,
    pub desired_ephemeral: u32,
    /// `scale_from_zero`, `panic`, `stable`, `lookahead`, `warm_floor`, `max_replicas`,
    /// `scale_down`, `hold`.
    pub reason: String,
    /// When these targets were first reported (RFC 3339).
    pub time: Time,
}

impl InferencePoolSpec {
    /// The validated scaling parameters and terminal TTL; errors name `spec.scaling.<field>`.
    pub fn scaling(&self, pool: &str) -> Result<(ScalingSpec, Duration), SpecError> {
        let s = &self.scaling;
        let fields = ScalingFields {
            min_warm: s.min_warm,
            max_replicas: s.max_replicas,
            target_concurrency: s.target_concurrency,
            stable_window_secs: s.stable_window_secs,
            panic_window_secs: s.panic_window_secs,
            panic_threshold: s.panic_threshold,
            max_scale_up_rate: s.max_scale_up_rate,
            max_scale_down_rate: s.max_scale_down_rate,
            idle_ttl_secs: s.idle_ttl_secs,
            terminal_ttl_secs: s.terminal_ttl_secs,
            target_utilization: s.target_utilization,
            lookahead: s.lookahead,
            executor_prefill_tokens_per_s: s.executor_prefill_tokens_per_s,
            executor_decode_tokens_per_s: s.executor_decode_tokens_per_s,
            executor_kv_tokens: s.executor_kv_tokens,
        };
        crate::spec::scaling(&fields, &|field, value, reason| SpecError::Invalid {
            path: format!("InferencePool {pool}"),
            field: format!("spec.scaling.{}", camel(field)),
            value: value.to_string(),
            reason: reason.to_owned(),
        })
    }
}

/// `snake_case` → `camelCase`, for naming spec fields in errors.
fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The CRD as YAML, as `crdgen` writes it to `manifests/base/crd.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = InferencePool::crd();
    format!(
        "# Generated by `cargo run -p llmctl-pool-controller --bin crdgen`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("the CRD serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_round_trips_and_its_scaling_is_validated_with_the_local_rules() {
        let yaml = r#"
apiVersion: llmctl.io/v1alpha1
kind: InferencePool
metadata: {name: chat, namespace: llmctl}
spec:
  model: meta-llama/Llama-3.1-8B-Instruct
  servedModelNames: [llama-3.1-8b]
  runtime: Llmctl
  executor:
    image: llmctl/worker:latest
    args: [--device, cuda]
    resources: {limits: {nvidia.com/gpu: "1"}}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  scaling: {minWarm: 1, maxReplicas: 4, idleTtlSecs: 300}
"#;
        let pool: InferencePool = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(pool.spec.scaling.max_replicas, Some(4));
        let (scaling, ttl) = pool.spec.scaling("chat").unwrap();
        assert_eq!(scaling.idle_ttl, Duration::from_secs(300));
        assert_eq!(ttl, Duration::from_secs(300));
        let again: InferencePool =
            serde_yaml::from_str(&serde_yaml::to_string(&pool).unwrap()).unwrap();
        assert_eq!(again.spec, pool.spec);

        let mut bad = pool.spec.clone();
        bad.scaling.max_replicas = Some(0);
        let e = bad.scaling("chat").unwrap_err().to_string();
        assert!(
            e.contains("spec.scaling.maxReplicas") && e.contains("chat"),
            "{e}"
        );
    }
}
