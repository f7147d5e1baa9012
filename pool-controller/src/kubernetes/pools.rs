//! Keeps one reconciler (with a Kubernetes provider and a status reporter) per `InferencePool`
//! in the namespace, driven by kube's runtime `Controller` (`reconcile` and `error_policy`, as
//! in kube-rs's reference controller): a new pool starts, a pool whose spec changed (a new
//! `metadata.generation`) restarts (its reconciler adopts the running pods, so no executor is
//! lost). The runtime calls `reconcile` only for pools that exist, so a deleted pool's
//! reconciler is stopped by a sweep against the controller's store (its pods go with it
//! through their owner references). A spec that does not validate leaves the previous
//! reconciler running and is reported on the resource (`Accepted=False, reason InvalidSpec`,
//! kept there by the running pool's status reporter) and as a Warning event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::controller::Controller;
use crate::crd::{InferencePool, InferencePoolStatus};
use crate::kubernetes::status;
use crate::provider::kubernetes::{KubernetesConfig, KubernetesProvider};
use crate::reconciler::PoolConfig;
use crate::spec::SpecError;

/// Defaults for fields a pool leaves out.
const DEFAULT_MAX_CONCURRENCY: u32 = 32;
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Pool names become label values and pod name prefixes (`<pool>-warm-<n>`).
const MAX_POOL_NAME: usize = 50;
/// How often running reconcilers are checked against the pools that still exist.
const SWEEP: Duration = Duration::from_secs(1);
/// A failed reconcile is tried again after this long.
const RETRY: Duration = Duration::from_secs(5);

/// Why reconciling a pool failed (it is tried again after `RETRY`).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("writing the status of InferencePool {pool}: {source}")]
    Status { pool: String, source: kube::Error },
}

pub struct Pools {
    client: Client,
    namespace: String,
    controller: Arc<Controller>,
    recorder: Recorder,
    /// Time between the reconcilers' decisions.
    tick: Duration,
    /// One pool's reconcile at a time (starting and stopping reconcilers awaits).
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: HashMap<String, RunningPool>,
    /// The generation whose invalid spec was already reported, per pool.
    reported_invalid: HashMap<String, Option<i64>>,
}

struct RunningPool {
    uid: Option<String>,
    generation: Option<i64>,
    status: JoinHandle<()>,
    /// Why the pool's newest spec was refused, for its status reporter.
    rejected: watch::Sender<Option<String>>,
}

impl Pools {
    pub fn new(
        client: Client,
        namespace: String,
        controller: Arc<Controller>,
        recorder: Recorder,
        tick: Duration,
    ) -> Self {
        Self {
            client,
            namespace,
            controller,
            recorder,
            tick,
            state: Mutex::default(),
        }
    }

    fn api(&self) -> Api<InferencePool> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Runs the controller until its watch ends (it backs off and retries by itself).
    pub async fn run(self) {
        let pools = Arc::new(self);
        let controller = kube::runtime::Controller::new(pools.api(), watcher::Config::default());
        let store = controller.store();
        // Stopped with this future, also when it is dropped (leadership lost, shutdown).
        let _sweeper = AbortOnDrop(tokio::spawn(pools.clone().sweep(store)));
        controller
            .run(reconcile, error_policy, pools)
            .for_each(|outcome| async move {
                if let Err(e) = outcome {
                    tracing::debug!("InferencePool controller: {e}");
                }
            })
            .await;
    }

    /// Stops the reconcilers of pools that no longer exist (or are being deleted).
    async fn sweep(self: Arc<Self>, store: Store<InferencePool>) {
        // Before the first complete list an empty store means nothing. Asked afresh each
        // period: a wait begun before the list completed did not wake in our tests (kube-runtime
        // 5, paused clock), one begun after returns at once.
        loop {
            match tokio::time::timeout(SWEEP, store.wait_until_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
        let mut tick = tokio::time::interval(SWEEP);
        loop {
            tick.tick().await;
            // Read under the lock: a pool created and started meanwhile is in the store.
            let mut state = self.state.lock().await;
            let live: Vec<String> = store
                .state()
                .iter()
                .filter(|p| p.meta().deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect();
            let gone: Vec<String> = state
                .running
                .keys()
                .filter(|name| !live.contains(name))
                .cloned()
                .collect();
            for name in gone {
                tracing::info!(pool = %name, "InferencePool deleted; stopping its reconciler");
                self.stop(&mut state, &name).await;
            }
            state.reported_invalid.retain(|name, _| live.contains(name));
        }
    }

    /// Brings this pool's reconciler in line with its spec.
    async fn reconcile(&self, pool: &InferencePool) -> Result<(), PoolError> {
        let name = pool.name_any();
        let mut state = self.state.lock().await;
        if pool.meta().deletion_timestamp.is_some() {
            self.stop(&mut state, &name).await;
            return Ok(());
        }
        if state
            .running
            .get(&name)
            .is_some_and(|r| r.generation == pool.metadata.generation && r.uid == pool.metadata.uid)
        {
            return Ok(());
        }
        match self.configs(pool) {
            Ok((pool_config, provider_config)) => {
                state.reported_invalid.remove(&name);
                self.stop(&mut state, &name).await;
                self.start(&mut state, pool, pool_config, provider_config);
                Ok(())
            }
            Err(e) => self.report_invalid(&mut state, pool, e).await,
        }
    }

    /// The reconciler's and the provider's settings, validated.
    fn configs(&self, pool: &InferencePool) -> Result<(PoolConfig, KubernetesConfig), SpecError> {
        let name = pool.name_any();
        let invalid = |field: &str, value: String, reason: &str| SpecError::Invalid {
            path: format!("InferencePool {name}"),
            field: field.to_owned(),
            value,
            reason: reason.to_owned(),
        };
        if name.len() > MAX_POOL_NAME {
            return Err(invalid(
                "metadata.name",
                name.clone(),
                "must be at most 50 characters (it prefixes pod names and is a label value)",
            ));
        }
        let spec = &pool.spec;
        if spec.model.trim().is_empty() {
            return Err(invalid(
                "spec.model",
                spec.model.clone(),
                "must not be empty",
            ));
        }
        if spec.executor.image.trim().is_empty() {
            return Err(invalid(
                "spec.executor.image",
                spec.executor.image.clone(),
                "must not be empty",
            ));
        }
        let max_concurrency = spec
            .executor
            .max_concurrency
            .unwrap_or(DEFAULT_MAX_CONCURRENCY);
        if max_concurrency == 0 {
            return Err(invalid(
                "spec.executor.maxConcurrency",
                "0".into(),
                "must be at least 1",
            ));
        }
        if let Some(port) = spec.executor.port
            && !(1..=65535).contains(&port)
        {
            return Err(invalid(
                "spec.executor.port",
                port.to_string(),
                "must be in 1..=65535",
            ));
        }
        let (scaling, terminal_ttl) = spec.scaling(&name)?;
        let drain_grace = spec
            .executor
            .drain_grace_secs
            .map_or(DEFAULT_DRAIN_GRACE, Duration::from_secs);
        let owner = pool
            .controller_owner_ref(&())
            .ok_or_else(|| invalid("metadata.uid", String::new(), "the pool has no uid yet"))?;
        Ok((
            PoolConfig {
                name: name.clone(),
                scaling,
                tick: self.tick,
                drain_grace,
                terminal_ttl,
                endpoint_concurrency: max_concurrency as usize,
            },
            KubernetesConfig {
                pool: name,
                owner,
                spec: spec.clone(),
                startup_timeout: spec
                    .executor
                    .startup_timeout_secs
                    .map_or(DEFAULT_STARTUP_TIMEOUT, Duration::from_secs),
                drain_grace,
                terminal_ttl,
                sweep: Duration::from_secs(1),
            },
        ))
    }

    fn start(
        &self,
        state: &mut State,
        pool: &InferencePool,
        config: PoolConfig,
        provider: KubernetesConfig,
    ) {
        let name = config.name.clone();
        tracing::info!(pool = %name, generation = ?pool.metadata.generation, "starting the pool's reconciler");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let (provider, events) = KubernetesProvider::new(pods, provider);
        let status_rx = self.controller.add_pool(config, provider, events);
        let (rejected, rejected_rx) = watch::channel(None);
        let status = tokio::spawn(status::report(
            self.api(),
            self.recorder.clone(),
            pool.object_ref(&()),
            pool.metadata.generation,
            status_rx,
            rejected_rx,
        ));
        state.running.insert(
            name,
            RunningPool {
                uid: pool.metadata.uid.clone(),
                generation: pool.metadata.generation,
                status,
                rejected,
            },
        );
    }

    async fn stop(&self, state: &mut State, name: &str) {
        if let Some(running) = state.running.remove(name) {
            running.status.abort();
            self.controller.remove_pool(name).await;
        }
    }

    /// Once per generation: a Warning event and `Accepted=False, reason InvalidSpec` on the
    /// pool (from its running reconciler's status reporter when there is one, which keeps it
    /// there; else written here with `Ready=False` too, as nothing runs).
    async fn report_invalid(
        &self,
        state: &mut State,
        pool: &InferencePool,
        e: SpecError,
    ) -> Result<(), PoolError> {
        let name = pool.name_any();
        if state.reported_invalid.get(&name) == Some(&pool.metadata.generation) {
            return Ok(());
        }
        let message = e.to_string();
        tracing::warn!(pool = %name, "invalid InferencePool: {message}");
        if let Some(running) = state.running.get(&name) {
            running.rejected.send_replace(Some(message.clone()));
        } else {
            let previous: InferencePoolStatus = pool.status.clone().unwrap_or_default();
            let mut status = previous.clone();
            status.conditions = vec![
                status::condition(
                    Some(&previous),
                    "Ready",
                    "False",
                    "InvalidSpec",
                    message.clone(),
                    pool.metadata.generation,
                ),
                status::accepted(Some(&previous), Some(&message), pool.metadata.generation),
            ];
            status::apply(&self.api(), &name, &status)
                .await
                .map_err(|source| PoolError::Status {
                    pool: name.clone(),
                    source,
                })?;
        }
        state
            .reported_invalid
            .insert(name.clone(), pool.metadata.generation);
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidSpec".to_owned(),
            note: Some(message),
            action: "Validate".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pool.object_ref(&())).await {
            tracing::warn!(pool = %name, "publishing an event: {e}");
        }
        Ok(())
    }
}

/// The runtime's reconcile: every change to a pool (and retries after errors) lands here.
async fn reconcile(pool: Arc<InferencePool>, pools: Arc<Pools>) -> Result<Action, PoolError> {
    pools.reconcile(&pool).await?;
    Ok(Action::await_change())
}

fn error_policy(pool: Arc<InferencePool>, error: &PoolError, _: Arc<Pools>) -> Action {
    tracing::warn!(pool = %pool.name_any(), "{error}; retrying in {}s", RETRY.as_secs());
    Action::requeue(RETRY)
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
