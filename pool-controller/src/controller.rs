//! The controller process: one reconciler per pool, the demand book the gateways report into,
//! and the endpoint snapshot the gateways watch. Pools come and go while it runs (the local spec
//! file adds them all at start; on Kubernetes they follow the `InferencePool` resources). The
//! control API (`api`, which depends on this module, not the reverse) reads and writes through
//! [`Controller`]. [`start`] brings up the local
//! controller; [`Controller::shutdown`] stops every reconciler (the local provider drains its
//! executors and waits for the children to be gone).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use llmctl_protocol::control::{DemandReport, Endpoint, EndpointSnapshot, PoolDemand};

use crate::demand::DemandBook;
use crate::metrics::Metrics;
use crate::provider::local::{LocalConfig, LocalProvider};
use crate::provider::{ExecutorEvent, Provider};
use crate::reconciler::{PoolConfig, PoolStatus, Reconciler};
use crate::spec::{ControllerConfig, PoolSpec};

/// One running pool: its reconciler and the follower that folds its endpoints into the snapshot.
struct Pool {
    status: watch::Receiver<PoolStatus>,
    demand: mpsc::Sender<PoolDemand>,
    reconciler: JoinHandle<()>,
    follower: JoinHandle<()>,
}

pub struct Controller {
    pools: RwLock<BTreeMap<String, Pool>>,
    book: Mutex<DemandBook>,
    origin: Instant,
    snapshot: watch::Sender<EndpointSnapshot>,
    /// Whether this replica should receive traffic (`/readyz`): always for the local
    /// controller, only while leading on Kubernetes.
    ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    #[error("no pool named {0:?}")]
    UnknownPool(String),
}

impl Controller {
    pub fn new(demand_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            pools: RwLock::default(),
            book: Mutex::new(DemandBook::new(demand_ttl)),
            origin: Instant::now(),
            snapshot: watch::channel(EndpointSnapshot::default()).0,
            ready: AtomicBool::new(true),
            metrics: Arc::new(Metrics::new()),
        })
    }

    pub fn pools(&self) -> Vec<PoolStatus> {
        self.read()
            .values()
            .map(|p| p.status.borrow().clone())
            .collect()
    }

    pub fn pool(&self, name: &str) -> Option<PoolStatus> {
        self.read().get(name).map(|p| p.status.borrow().clone())
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn endpoints(&self) -> watch::Receiver<EndpointSnapshot> {
        self.snapshot.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Pool>> {
        self.pools.read().expect("pool map lock")
    }

    /// Starts a reconciler for `config` driving `provider`, and returns its status channel.
    pub fn add_pool<P: Provider>(
        self: &Arc<Self>,
        config: PoolConfig,
        provider: P,
        events: mpsc::UnboundedReceiver<ExecutorEvent>,
    ) -> watch::Receiver<PoolStatus> {
        let name = config.name.clone();
        let (reconciler, status) = Reconciler::new(config, provider, self.metrics.clone());
        let (demand, rx) = mpsc::channel(256);
        let reconciler = tokio::spawn(reconciler.run(events, rx));
        let follower = tokio::spawn({
            let controller = Arc::downgrade(self);
            let mut status = status.clone();
            async move {
                while status.changed().await.is_ok() {
                    let Some(controller) = controller.upgrade() else {
                        return;
                    };
                    controller.refresh_snapshot();
                }
            }
        });
        let pool = Pool {
            status: status.clone(),
            demand,
            reconciler,
            follower,
        };
        self.pools
            .write()
            .expect("pool map lock")
            .insert(name, pool);
        self.refresh_snapshot();
        status
    }

    /// Stops pool `name`'s reconciler and waits for its provider's shutdown.
    pub async fn remove_pool(&self, name: &str) {
        let pool = self.pools.write().expect("pool map lock").remove(name);
        self.refresh_snapshot();
        if let Some(pool) = pool {
            pool.follower.abort();
            // Closing the demand channel is the reconciler's signal to stop.
            drop(pool.demand);
            let _ = pool.reconciler.await;
        }
    }

    /// Stops every reconciler (each provider shuts down its way).
    pub async fn shutdown(&self) {
        self.set_ready(false);
        let pools: Vec<Pool> = std::mem::take(&mut *self.pools.write().expect("pool map lock"))
            .into_values()
            .collect();
        self.refresh_snapshot();
        let mut reconcilers = Vec::new();
        for pool in pools {
            pool.follower.abort();
            drop(pool.demand);
            reconcilers.push(pool.reconciler);
        }
        for task in reconcilers {
            let _ = task.await;
        }
    }

    /// Rebuilds the endpoint snapshot; watchers wake only when an endpoint set changed.
    fn refresh_snapshot(&self) {
        let pools: BTreeMap<String, Vec<Endpoint>> = self
            .read()
            .iter()
            .filter_map(|(name, p)| {
                let status = p.status.borrow();
                status
                    .adopted
                    .then(|| (name.clone(), status.endpoints.clone()))
            })
            .collect();
        self.snapshot.send_if_modified(|snap| {
            if pools == snap.pools {
                return false;
            }
            snap.pools = pools;
            snap.revision += 1;
            true
        });
    }

    /// Records one gateway's report (all pools checked first: a bad report changes nothing)
    /// and passes the new totals to the reconcilers.
    pub fn report(&self, report: DemandReport) -> Result<(), DemandError> {
        {
            let pools = self.read();
            if let Some(d) = report.pools.iter().find(|d| !pools.contains_key(&d.pool)) {
                return Err(DemandError::UnknownPool(d.pool.clone()));
            }
        }
        let now = self.origin.elapsed();
        let mut pools: Vec<String> = report.pools.iter().map(|d| d.pool.clone()).collect();
        {
            let mut book = self.book.lock().expect("demand book lock");
            for d in report.pools {
                book.report(now, &report.gateway, d);
            }
        }
        pools.sort();
        pools.dedup();
        for pool in pools {
            self.push_demand(&pool);
        }
        Ok(())
    }

    /// Sends `pool`'s current total (quiet gateways expired) to its reconciler.
    fn push_demand(&self, pool: &str) {
        let now = self.origin.elapsed();
        let (total, gateways) = {
            let mut book = self.book.lock().expect("demand book lock");
            let total = book.total(now, pool);
            (total, book.gateways())
        };
        self.metrics.demand(&total, gateways);
        if let Some(p) = self.read().get(pool) {
            // A full channel means the reconciler is busy launching; the next report or the
            // periodic refresh carries the same information.
            let _ = p.demand.try_send(total);
        }
    }

    /// Pushes every pool's total once a second, so quiet gateways expire even when nobody
    /// reports.
    pub fn spawn_demand_refresh(self: &Arc<Self>) -> JoinHandle<()> {
        let controller = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let Some(controller) = controller.upgrade() else {
                    return;
                };
                for pool in controller.pool_names() {
                    controller.push_demand(&pool);
                }
            }
        })
    }
}

/// The started local controller.
pub struct Running {
    pub addr: SocketAddr,
    pub controller: Arc<Controller>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the reconcilers, which drain their executors (SIGTERM, SIGKILL after the grace)
    /// and return when the children are gone.
    pub async fn shutdown(self) {
        self.controller.shutdown().await;
        for task in self.background {
            task.abort();
        }
    }
}

/// The local provider's settings for one pool.
fn local_config(
    spec: &PoolSpec,
    program: &std::path::Path,
    log_dir: &std::path::Path,
) -> LocalConfig {
    let mut args = vec![
        "worker".to_owned(),
        "--model".to_owned(),
        spec.executor.model.display().to_string(),
        "--served-model-name".to_owned(),
        spec.models[0].clone(),
        "--drain-grace-secs".to_owned(),
        spec.executor.drain_grace.as_secs().to_string(),
    ];
    args.extend(spec.executor.args.iter().cloned());
    LocalConfig {
        program: program.to_path_buf(),
        args,
        log_dir: log_dir.join(&spec.name),
        startup_timeout: spec.executor.startup_timeout,
    }
}

/// Starts every pool of the spec file with the local provider, and the control API.
/// `worker_program` is the `llmctl` binary the local provider runs as `llmctl worker`.
pub async fn start(config: ControllerConfig, worker_program: PathBuf) -> anyhow::Result<Running> {
    let controller = Controller::new(config.demand_ttl);
    for spec in &config.pools {
        let (provider, events) =
            LocalProvider::new(local_config(spec, &worker_program, &config.log_dir));
        controller.add_pool(
            PoolConfig {
                name: spec.name.clone(),
                scaling: spec.scaling.clone(),
                tick: config.tick,
                drain_grace: spec.executor.drain_grace,
                terminal_ttl: spec.terminal_ttl,
                endpoint_concurrency: spec.executor.max_concurrency,
            },
            provider,
            events,
        );
    }
    let refresh = controller.spawn_demand_refresh();
    let (addr, api) = crate::api::listen(&controller, config.listen).await?;
    tracing::info!(%addr, pools = config.pools.len(), "controller listening");
    Ok(Running {
        addr,
        controller,
        background: vec![refresh, api],
    })
}
