//! Keeps one reconciler (with a Kubernetes provider and a status reporter) per `InferencePool`
//! in the namespace. The pools are followed with kube's runtime `reflector`; after every change
//! the whole set is synced: a new pool starts, a pool whose spec changed (a new
//! `metadata.generation`) restarts (its reconciler adopts the running pods, so no executor is
//! lost), a deleted pool stops (its pods go with it through their owner references). A spec
//! that does not validate leaves the previous reconciler running and is reported on the
//! resource (`Accepted=False, reason InvalidSpec`, kept there by the running pool's status
//! reporter) and as a Warning event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
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

pub struct Pools {
    client: Client,
    namespace: String,
    controller: Arc<Controller>,
    recorder: Recorder,
    /// Time between the reconcilers' decisions.
    tick: Duration,
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
            running: HashMap::new(),
            reported_invalid: HashMap::new(),
        }
    }

    fn api(&self) -> Api<InferencePool> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Follows the namespace's pools until the watch ends (it retries with backoff by itself).
    pub async fn run(mut self) {
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(self.api(), watcher::Config::default()))
            .default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut resync = tokio::time::interval(Duration::from_secs(10));
        // Deletions are only known from a complete list: nothing is synced before the first.
        let mut listed = false;
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(watcher::Event::InitDone)) => listed = true,
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {}
                    Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                    Some(Err(e)) => {
                        tracing::warn!("InferencePool watch: {e}");
                        continue;
                    }
                    None => return,
                },
                _ = resync.tick() => {}
            }
            if listed {
                self.sync(&reader).await;
            }
        }
    }

    /// Brings the running reconcilers in line with the pools in `store`.
    pub async fn sync(&mut self, store: &Store<InferencePool>) {
        let pools = store.state();
        for pool in &pools {
            let name = pool.name_any();
            if pool.meta().deletion_timestamp.is_some() {
                self.stop(&name).await;
                continue;
            }
            let current = self.running.get(&name);
            if current.is_some_and(|r| {
                r.generation == pool.metadata.generation && r.uid == pool.metadata.uid
            }) {
                continue;
            }
            match self.configs(pool) {
                Ok((pool_config, provider_config)) => {
                    self.reported_invalid.remove(&name);
                    self.stop(&name).await;
                    self.start(pool, pool_config, provider_config);
                }
                Err(e) => self.report_invalid(pool, e).await,
            }
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !pools.iter().any(|p| p.name_any() == **name))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(pool = %name, "InferencePool deleted; stopping its reconciler");
            self.stop(&name).await;
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

    fn start(&mut self, pool: &InferencePool, config: PoolConfig, provider: KubernetesConfig) {
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
        self.running.insert(
            name,
            RunningPool {
                uid: pool.metadata.uid.clone(),
                generation: pool.metadata.generation,
                status,
                rejected,
            },
        );
    }

    async fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            running.status.abort();
            self.controller.remove_pool(name).await;
        }
    }

    /// Stops every reconciler (the pods stay for the next leader).
    pub async fn stop_all(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// Once per generation: a Warning event and `Accepted=False, reason InvalidSpec` on the
    /// pool (from its running reconciler's status reporter when there is one, which keeps it
    /// there; else written here with `Ready=False` too, as nothing runs).
    async fn report_invalid(&mut self, pool: &InferencePool, e: SpecError) {
        let name = pool.name_any();
        if self.reported_invalid.get(&name) == Some(&pool.metadata.generation) {
            return;
        }
        self.reported_invalid
            .insert(name.clone(), pool.metadata.generation);
        let message = e.to_string();
        tracing::warn!(pool = %name, "invalid InferencePool: {message}");
        if let Some(running) = self.running.get(&name) {
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
            if let Err(e) = status::apply(&self.api(), &name, &status).await {
                tracing::warn!(pool = %name, "writing the pool status: {e}");
            }
        }
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
    }
}
