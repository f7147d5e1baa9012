//! The Kubernetes provider: each executor is a Pod in the pool's namespace, named by its
//! executor id, labelled `llmctl.io/pool` and `llmctl.io/class`, and owned by its
//! `InferencePool` (deleting the pool deletes its pods). A pod watcher (kube's runtime
//! `watcher`, filtered to the pool's label) turns pod changes into [`ExecutorEvent`]s:
//!
//! - ready when the pod's `Ready` condition is true and it has an IP (endpoint `ip:port`);
//! - terminated when the pod fails or succeeds (the container's reason and exit code), or when
//!   it is being deleted (by us when reaping, or by anyone else: an eviction, a `kubectl delete`);
//! - a pod that cannot be scheduled (no GPU node yet) is coming capacity: it stays starting and
//!   is never timed out, since a cluster autoscaler may be adding the node; a scheduled pod that
//!   is not ready within the startup timeout (an image that cannot be pulled, a weight load that
//!   hangs) is deleted and reported terminated;
//! - terminal pods (`restartPolicy: Never`, so a crash is visible) are deleted after
//!   `terminal_ttl`.
//!
//! The reconciler above replaces failed executors with backoff, as it does for local ones. When
//! the reconciler stops (the controller shuts down or loses its leadership) the pods stay: the
//! next leader adopts them from the watcher's initial list.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, Pod, PodSpec, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Adopted, ExecutorEvent, Provider, ProviderError};
use crate::autoscaler::Class;
use crate::crd::{InferencePoolSpec, Runtime};
use crate::metrics::class_name;

pub const POOL_LABEL: &str = "llmctl.io/pool";
pub const CLASS_LABEL: &str = "llmctl.io/class";
pub const FIELD_MANAGER: &str = "llmctl-controller";
/// The executor container's name in every pod.
pub const CONTAINER: &str = "executor";
pub const DEFAULT_PORT: i32 = 8000;

/// One pool's provider settings.
#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    /// The pool (the `InferencePool`'s name; pods carry it in `llmctl.io/pool`).
    pub pool: String,
    /// The owner reference every pod gets (the `InferencePool`, as controller).
    pub owner: OwnerReference,
    pub spec: InferencePoolSpec,
    /// Scheduled to ready, at most.
    pub startup_timeout: Duration,
    pub drain_grace: Duration,
    /// How long a failed or finished pod is kept (for `kubectl logs`) before it is deleted.
    pub terminal_ttl: Duration,
    /// How often timeouts and TTLs are checked.
    pub sweep: Duration,
}

impl KubernetesConfig {
    pub fn port(&self) -> i32 {
        self.spec.executor.port.unwrap_or(DEFAULT_PORT)
    }
}

pub struct KubernetesProvider {
    pods: Api<Pod>,
    config: Arc<KubernetesConfig>,
    events: mpsc::UnboundedSender<ExecutorEvent>,
    adopted: Mutex<Option<oneshot::Receiver<Vec<Adopted>>>>,
    watch: JoinHandle<()>,
}

impl KubernetesProvider {
    /// The provider (its pod watcher already running) and its executors' events.
    pub fn new(
        pods: Api<Pod>,
        config: KubernetesConfig,
    ) -> (Self, mpsc::UnboundedReceiver<ExecutorEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let (adopted_tx, adopted_rx) = oneshot::channel();
        let config = Arc::new(config);
        let watch = tokio::spawn(
            PodWatch {
                pods: pods.clone(),
                config: config.clone(),
                events: events.clone(),
                tracked: HashMap::new(),
                adopted: Some(adopted_tx),
            }
            .run(),
        );
        let provider = Self {
            pods,
            config,
            events,
            adopted: Mutex::new(Some(adopted_rx)),
            watch,
        };
        (provider, rx)
    }
}

impl Provider for KubernetesProvider {
    /// Waits for the watcher's first complete list of the pool's pods.
    async fn adopt(&self) -> Vec<Adopted> {
        let rx = self.adopted.lock().expect("adoption lock").take();
        match rx {
            Some(rx) => rx.await.unwrap_or_default(),
            None => Vec::new(),
        }
    }

    async fn launch(&self, id: &str, class: Class) -> Result<(), ProviderError> {
        let pod = executor_pod(&self.config, id, class);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        self.pods
            .create(&params, &pod)
            .await
            .map_err(|e| ProviderError::Launch {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        let _ = self.events.send(ExecutorEvent::Starting {
            id: id.to_owned(),
            class,
            pid: None,
        });
        Ok(())
    }

    /// Deletes the pod with `grace` as its termination grace period (the worker drains on
    /// SIGTERM); the watcher reports it terminated.
    async fn terminate(&self, id: &str, grace: Duration) -> Result<(), ProviderError> {
        delete_pod(&self.pods, id, grace)
            .await
            .map_err(|reason| ProviderError::Terminate {
                id: id.to_owned(),
                reason,
            })
    }

    /// Stops watching; the pods stay for the next leader.
    async fn shutdown(self, _grace: Duration, _events: mpsc::UnboundedReceiver<ExecutorEvent>) {
        self.watch.abort();
    }
}

/// Deletes pod `name`; one already gone is not an error.
async fn delete_pod(pods: &Api<Pod>, name: &str, grace: Duration) -> Result<(), String> {
    let params = DeleteParams {
        grace_period_seconds: Some(grace.as_secs() as u32),
        ..DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The pod of executor `id`: the pool's template, our labels and owner, the runtime's command
/// line and readiness probe.
pub fn executor_pod(config: &KubernetesConfig, id: &str, class: Class) -> Pod {
    let spec = &config.spec;
    let t = &spec.executor;
    let port = config.port();
    let served = spec
        .served_model_names
        .first()
        .cloned()
        .unwrap_or_else(|| config.pool.clone());
    let (args, ready_path) = match spec.runtime {
        Runtime::Llmctl => {
            let mut args: Vec<String> = [
                "worker",
                "--model",
                &spec.model,
                "--served-model-name",
                &served,
                "--host",
                "0.0.0.0",
                "--port",
                &port.to_string(),
                "--drain-grace-secs",
                &config.drain_grace.as_secs().to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            args.extend(t.args.iter().cloned());
            (args, "/health")
        }
        // Any OpenAI-compatible image takes its own command line, as written in the template
        // (which can name the pool's model, served name and port as `$(LLMCTL_MODEL)`,
        // `$(LLMCTL_SERVED_MODEL_NAME)` and `$(LLMCTL_PORT)`: the kubelet expands them).
        Runtime::OpenAiCompatible => (t.args.clone(), "/v1/models"),
    };
    // Ours first, so the template's own variables may refer to them.
    let mut env: Vec<EnvVar> = [
        ("LLMCTL_MODEL", spec.model.clone()),
        ("LLMCTL_SERVED_MODEL_NAME", served.clone()),
        ("LLMCTL_PORT", port.to_string()),
        ("LLMCTL_POOL", config.pool.clone()),
    ]
    .into_iter()
    .map(|(name, value)| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    })
    .collect();
    env.extend(t.env.iter().cloned());
    let labels = BTreeMap::from([
        (POOL_LABEL.to_owned(), config.pool.clone()),
        (CLASS_LABEL.to_owned(), class_name(class).to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "llmctl-executor".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "llmctl-controller".to_owned(),
        ),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(id.to_owned()),
            labels: Some(labels),
            owner_references: Some(vec![config.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: CONTAINER.to_owned(),
                image: Some(t.image.clone()),
                args: Some(args),
                env: Some(env),
                resources: t.resources.clone(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".to_owned()),
                    container_port: port,
                    ..ContainerPort::default()
                }]),
                readiness_probe: Some(Probe {
                    http_get: Some(HTTPGetAction {
                        path: Some(ready_path.to_owned()),
                        port: IntOrString::Int(port),
                        ..HTTPGetAction::default()
                    }),
                    period_seconds: Some(2),
                    failure_threshold: Some(1),
                    ..Probe::default()
                }),
                volume_mounts: (!t.volume_mounts.is_empty()).then(|| t.volume_mounts.clone()),
                ..Container::default()
            }],
            // A crashed executor is replaced by the reconciler (with backoff and a new name),
            // so the failure stays visible instead of hiding in a restart count.
            restart_policy: Some("Never".to_owned()),
            // Executors never talk to the Kubernetes API: no credentials in their pods.
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(config.drain_grace.as_secs() as i64),
            node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
            tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
            volumes: (!t.volumes.is_empty()).then(|| t.volumes.clone()),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// What a pod's object says about its executor.
#[derive(Clone, Debug, PartialEq)]
enum PodState {
    /// Not placed on a node because none fits (yet).
    Unschedulable,
    /// Placed (or not yet looked at by the scheduler); not serving.
    Starting {
        scheduled: bool,
    },
    Ready {
        endpoint: String,
    },
    /// Failed or finished, with why.
    Terminal {
        reason: String,
    },
    /// Has a deletion timestamp.
    Deleting,
}

fn pod_state(pod: &Pod, port: i32) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Deleting;
    }
    let Some(status) = &pod.status else {
        return PodState::Starting { scheduled: false };
    };
    match status.phase.as_deref() {
        Some("Failed") | Some("Succeeded") => {
            return PodState::Terminal {
                reason: terminal_reason(pod),
            };
        }
        _ => {}
    }
    let condition = |kind: &str| status.conditions.iter().flatten().find(|c| c.type_ == kind);
    let ready = condition("Ready").is_some_and(|c| c.status == "True");
    if let (true, Some(ip)) = (ready, status.pod_ip.as_deref()) {
        let endpoint = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        return PodState::Ready { endpoint };
    }
    match condition("PodScheduled") {
        Some(c) if c.status == "False" && c.reason.as_deref() == Some("Unschedulable") => {
            PodState::Unschedulable
        }
        Some(c) => PodState::Starting {
            scheduled: c.status == "True",
        },
        None => PodState::Starting { scheduled: false },
    }
}

/// "Error, exit code 1", "OOMKilled, exit code 137", "Evicted: ..." — what `kubectl` would show.
fn terminal_reason(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.name == CONTAINER)
        .and_then(|c| c.state.as_ref()?.terminated.as_ref());
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Failed");
    match (terminated, status.and_then(|s| s.reason.as_deref())) {
        (Some(t), _) => format!(
            "{phase}: {}, exit code {}",
            t.reason.as_deref().unwrap_or("terminated"),
            t.exit_code
        ),
        (None, Some(reason)) => {
            let message = status.and_then(|s| s.message.as_deref()).unwrap_or("");
            format!("{phase}: {reason} {message}").trim_end().to_owned()
        }
        (None, None) => phase.to_owned(),
    }
}

/// The watcher's memory of one pod.
struct Tracked {
    /// Reported ready (or adopted ready).
    ready: bool,
    /// Reported terminated (or adopted as leaving): nothing more is sent for it.
    terminated: bool,
    /// When it was first seen scheduled and not ready (the startup timeout counts from here).
    scheduled_at: Option<Instant>,
    /// When it was first seen terminal (deleted `terminal_ttl` later).
    terminal_at: Option<Instant>,
}

/// Owns the pod watch of one pool.
struct PodWatch {
    pods: Api<Pod>,
    config: Arc<KubernetesConfig>,
    events: mpsc::UnboundedSender<ExecutorEvent>,
    tracked: HashMap<String, Tracked>,
    /// Where the first complete list goes; `None` once sent.
    adopted: Option<oneshot::Sender<Vec<Adopted>>>,
}

impl PodWatch {
    async fn run(mut self) {
        let selector = format!("{POOL_LABEL}={}", self.config.pool);
        let stream = watcher(
            self.pods.clone(),
            watcher::Config::default().labels(&selector),
        )
        .default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut sweep = tokio::time::interval(self.config.sweep);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pods listed since the last (re)start of the watch.
        let mut listing: Vec<Pod> = Vec::new();
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(watcher::Event::Init)) => listing.clear(),
                    Some(Ok(watcher::Event::InitApply(pod))) => listing.push(pod),
                    Some(Ok(watcher::Event::InitDone)) => self.on_list(std::mem::take(&mut listing)),
                    Some(Ok(watcher::Event::Apply(pod))) => self.on_pod(&pod),
                    Some(Ok(watcher::Event::Delete(pod))) => self.on_gone(&pod),
                    Some(Err(e)) => {
                        // The stream backs off before it retries; the last known state holds.
                        tracing::warn!(pool = %self.config.pool, "pod watch: {e}");
                    }
                    None => return,
                },
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    /// A complete list: the first one is the adoption; a later one (after the watch restarted)
    /// also tells which pods vanished while it was down.
    fn on_list(&mut self, pods: Vec<Pod>) {
        if let Some(tx) = self.adopted.take() {
            let port = self.config.port();
            let mut adopted = Vec::new();
            for pod in &pods {
                let Some((id, class)) = identify(pod) else {
                    continue;
                };
                let state = pod_state(pod, port);
                let leaving = matches!(state, PodState::Terminal { .. } | PodState::Deleting);
                let endpoint = match &state {
                    PodState::Ready { endpoint } => Some(endpoint.clone()),
                    _ => None,
                };
                self.tracked.insert(
                    id.clone(),
                    Tracked {
                        ready: endpoint.is_some(),
                        terminated: leaving,
                        scheduled_at: None,
                        terminal_at: None,
                    },
                );
                adopted.push(Adopted {
                    id,
                    class,
                    endpoint,
                    leaving,
                });
            }
            // Timers of adopted pods start now (their history is not known).
            for pod in &pods {
                self.on_pod(pod);
            }
            let _ = tx.send(adopted);
            return;
        }
        let listed: std::collections::HashSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        let vanished: Vec<String> = self
            .tracked
            .keys()
            .filter(|id| !listed.contains(id.as_str()))
            .cloned()
            .collect();
        for id in vanished {
            self.forget(&id, "deleted");
        }
        for pod in &pods {
            self.on_pod(pod);
        }
    }

    fn on_pod(&mut self, pod: &Pod) {
        let Some((id, _)) = identify(pod) else {
            return;
        };
        let state = pod_state(pod, self.config.port());
        let t = self.tracked.entry(id.clone()).or_insert(Tracked {
            ready: false,
            terminated: false,
            scheduled_at: None,
            terminal_at: None,
        });
        match state {
            PodState::Starting { .. } | PodState::Unschedulable if t.ready && !t.terminated => {
                // Its readiness probe fails now (overloaded, or sick). Not deleted for that at
                // once; if it stays unready for the startup timeout it is replaced.
                t.ready = false;
                t.scheduled_at = Some(Instant::now());
                tracing::warn!(pool = %self.config.pool, executor = %id, "executor pod no longer ready");
                let _ = self.events.send(ExecutorEvent::Unready {
                    id,
                    reason: "pod no longer ready".to_owned(),
                });
            }
            PodState::Ready { endpoint } if !t.ready && !t.terminated => {
                t.ready = true;
                t.scheduled_at = None;
                tracing::info!(pool = %self.config.pool, executor = %id, %endpoint, "executor pod ready");
                let _ = self.events.send(ExecutorEvent::Ready { id, endpoint });
            }
            PodState::Starting { scheduled: true } if t.scheduled_at.is_none() && !t.ready => {
                t.scheduled_at = Some(Instant::now());
            }
            PodState::Unschedulable => {
                // Coming capacity: no startup clock while no node fits.
                t.scheduled_at = None;
            }
            PodState::Terminal { reason } => {
                t.terminal_at.get_or_insert_with(Instant::now);
                if !t.terminated {
                    t.terminated = true;
                    let _ = self.events.send(ExecutorEvent::Terminated { id, reason });
                }
            }
            PodState::Deleting if !t.terminated => {
                t.terminated = true;
                let _ = self.events.send(ExecutorEvent::Terminated {
                    id,
                    reason: "pod deleted".to_owned(),
                });
            }
            _ => {}
        }
    }

    fn on_gone(&mut self, pod: &Pod) {
        if let Some((id, _)) = identify(pod) {
            self.forget(&id, "pod deleted");
        }
    }

    fn forget(&mut self, id: &str, reason: &str) {
        if let Some(t) = self.tracked.remove(id)
            && !t.terminated
        {
            let _ = self.events.send(ExecutorEvent::Terminated {
                id: id.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }

    /// Deletes pods that overstayed: scheduled but not ready within the startup timeout, and
    /// terminal ones past `terminal_ttl`.
    async fn sweep(&mut self) {
        let c = self.config.clone();
        let mut late = Vec::new();
        let mut expired = Vec::new();
        for (id, t) in &mut self.tracked {
            if !t.ready
                && !t.terminated
                && t.scheduled_at
                    .is_some_and(|at| at.elapsed() > c.startup_timeout)
            {
                t.terminated = true;
                late.push(id.clone());
            }
            if t.terminal_at
                .is_some_and(|at| at.elapsed() > c.terminal_ttl)
            {
                expired.push(id.clone());
            }
        }
        for id in late {
            let reason = format!(
                "not ready within {}s of being scheduled",
                c.startup_timeout.as_secs()
            );
            tracing::warn!(pool = %c.pool, executor = %id, "{reason}; deleting the pod");
            // With the drain grace: a scheduled container may hold a GPU until it has exited,
            // and a forced delete would let the pod's replacement race it for the device.
            if let Err(e) = delete_pod(&self.pods, &id, c.drain_grace).await {
                tracing::warn!(pool = %c.pool, executor = %id, "deleting a late pod: {e}");
            }
            let _ = self.events.send(ExecutorEvent::Terminated { id, reason });
        }
        for id in expired {
            match delete_pod(&self.pods, &id, Duration::ZERO).await {
                Ok(()) => {
                    tracing::info!(pool = %c.pool, executor = %id, "deleted terminal pod after its TTL");
                    if let Some(t) = self.tracked.get_mut(&id) {
                        t.terminal_at = None;
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %c.pool, executor = %id, "deleting a terminal pod: {e}")
                }
            }
        }
    }
}

/// The executor id (pod name) and class of one of our pods; `None` for a pod without our labels.
fn identify(pod: &Pod) -> Option<(String, Class)> {
    let name = pod.metadata.name.clone()?;
    let class = match pod.metadata.labels.as_ref()?.get(CLASS_LABEL)?.as_str() {
        "warm" => Class::Warm,
        "ephemeral" => Class::Ephemeral,
        _ => return None,
    };
    Some((name, class))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
    };

    fn config() -> KubernetesConfig {
        let spec: InferencePoolSpec = serde_json::from_value(serde_json::json!({
            "model": "/models/llama",
            "servedModelNames": ["llama"],
            "executor": {"image": "llmctl/worker:1", "args": ["--device", "cuda"], "port": 9000,
                         "resources": {"limits": {"nvidia.com/gpu": "1"}}}
        }))
        .unwrap();
        KubernetesConfig {
            pool: "chat".into(),
            owner: OwnerReference {
                api_version: "llmctl.io/v1alpha1".into(),
                kind: "InferencePool".into(),
                name: "chat".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                ..OwnerReference::default()
            },
            spec,
            startup_timeout: Duration::from_secs(60),
            drain_grace: Duration::from_secs(20),
            terminal_ttl: Duration::from_secs(30),
            sweep: Duration::from_secs(1),
        }
    }

    fn with_status(
        phase: &str,
        conditions: &[(&str, &str, Option<&str>)],
        ip: Option<&str>,
    ) -> Pod {
        let mut pod = executor_pod(&config(), "chat-warm-1", Class::Warm);
        pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: ip.map(Into::into),
            conditions: Some(
                conditions
                    .iter()
                    .map(|(t, s, r)| PodCondition {
                        type_: (*t).into(),
                        status: (*s).into(),
                        reason: r.map(Into::into),
                        ..PodCondition::default()
                    })
                    .collect(),
            ),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn the_pod_carries_labels_owner_command_line_probe_and_grace() {
        let pod = executor_pod(&config(), "chat-eph-7", Class::Ephemeral);
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[POOL_LABEL], "chat");
        assert_eq!(labels[CLASS_LABEL], "ephemeral");
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.termination_grace_period_seconds, Some(20));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = &spec.containers[0];
        let env: Vec<(&str, &str)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            env[..4],
            [
                ("LLMCTL_MODEL", "/models/llama"),
                ("LLMCTL_SERVED_MODEL_NAME", "llama"),
                ("LLMCTL_PORT", "9000"),
                ("LLMCTL_POOL", "chat"),
            ],
            "the pool's fields come first, for the template's args and env to refer to"
        );
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(
            args.starts_with(
                "worker --model /models/llama --served-model-name llama --host 0.0.0.0 --port 9000"
            ),
            "{args}"
        );
        assert!(args.ends_with("--device cuda"), "{args}");
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            (probe.path.as_deref(), &probe.port),
            (Some("/health"), &IntOrString::Int(9000))
        );
        assert!(
            c.resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()
                .contains_key("nvidia.com/gpu")
        );

        let mut other = config();
        other.spec.runtime = Runtime::OpenAiCompatible;
        let pod = executor_pod(&other, "chat-warm-1", Class::Warm);
        let c = &pod.spec.unwrap().containers[0];
        assert_eq!(c.args.as_ref().unwrap(), &["--device", "cuda"]);
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/v1/models")
        );
    }

    #[test]
    fn pod_states_follow_conditions_phase_and_deletion() {
        let port = 9000;
        let pending = with_status(
            "Pending",
            &[("PodScheduled", "False", Some("Unschedulable"))],
            None,
        );
        assert_eq!(pod_state(&pending, port), PodState::Unschedulable);
        let scheduled = with_status("Pending", &[("PodScheduled", "True", None)], None);
        assert_eq!(
            pod_state(&scheduled, port),
            PodState::Starting { scheduled: true }
        );
        let ready = with_status(
            "Running",
            &[("PodScheduled", "True", None), ("Ready", "True", None)],
            Some("10.0.0.7"),
        );
        assert_eq!(
            pod_state(&ready, port),
            PodState::Ready {
                endpoint: "10.0.0.7:9000".into()
            }
        );
        let v6 = with_status("Running", &[("Ready", "True", None)], Some("fd00::7"));
        assert_eq!(
            pod_state(&v6, port),
            PodState::Ready {
                endpoint: "[fd00::7]:9000".into()
            }
        );
        // Ready without an address is not an endpoint yet.
        let no_ip = with_status(
            "Running",
            &[("PodScheduled", "True", None), ("Ready", "True", None)],
            None,
        );
        assert_eq!(
            pod_state(&no_ip, port),
            PodState::Starting { scheduled: true }
        );

        let mut failed = with_status("Failed", &[], Some("10.0.0.7"));
        failed.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            name: CONTAINER.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 137,
                    reason: Some("OOMKilled".into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        assert_eq!(
            pod_state(&failed, port),
            PodState::Terminal {
                reason: "Failed: OOMKilled, exit code 137".into()
            }
        );
        let mut deleting = ready.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(pod_state(&deleting, port), PodState::Deleting);
    }
}
