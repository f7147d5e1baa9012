//! The controller process: one reconciler per pool (each with its own local provider), the
//! demand book the gateways report into, and the endpoint snapshot the gateways watch. The
//! control API (`api`) reads and writes through [`Controller`]. [`start`] brings it all up;
//! [`Running::shutdown`] drains every executor and waits for the children to be gone.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use llmctl_protocol::control::{DemandReport, Endpoint, EndpointSnapshot, PoolDemand};

use crate::demand::DemandBook;
use crate::metrics::Metrics;
use crate::provider::local::{LocalConfig, LocalProvider};
use crate::reconciler::{PoolConfig, PoolStatus, Reconciler};
use crate::spec::{ControllerConfig, PoolSpec};

struct Pool {
    status: watch::Receiver<PoolStatus>,
}

pub struct Controller {
    pools: BTreeMap<String, Pool>,
    /// Demand senders to the reconcilers; emptied at shutdown (which stops them).
    demand: Mutex<HashMap<String, mpsc::Sender<PoolDemand>>>,
    book: Mutex<DemandBook>,
    origin: Instant,
    endpoints: watch::Receiver<EndpointSnapshot>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    #[error("no pool named {0:?}")]
    UnknownPool(String),
}

impl Controller {
    pub fn pools(&self) -> Vec<PoolStatus> {
        self.pools
            .values()
            .map(|p| p.status.borrow().clone())
            .collect()
    }

    pub fn pool(&self, name: &str) -> Option<PoolStatus> {
        self.pools.get(name).map(|p| p.status.borrow().clone())
    }

    pub fn endpoints(&self) -> watch::Receiver<EndpointSnapshot> {
        self.endpoints.clone()
    }

    /// Records one gateway's report (all pools checked first: a bad report changes nothing)
    /// and passes the new totals to the reconcilers.
    pub fn report(&self, report: DemandReport) -> Result<(), DemandError> {
        if let Some(d) = report
            .pools
            .iter()
            .find(|d| !self.pools.contains_key(&d.pool))
        {
            return Err(DemandError::UnknownPool(d.pool.clone()));
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
        self.metrics
            .demand(pool, total.queued, total.in_flight, gateways);
        let demand = self.demand.lock().expect("demand senders lock");
        if let Some(tx) = demand.get(pool) {
            // A full channel means the reconciler is busy launching; the next report or the
            // periodic refresh carries the same information.
            let _ = tx.try_send(total);
        }
    }
}

/// The started controller.
pub struct Running {
    pub addr: SocketAddr,
    pub controller: Arc<Controller>,
    reconcilers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the reconcilers, which drain their executors (SIGTERM, SIGKILL after the grace)
    /// and return when the children are gone.
    pub async fn shutdown(self) {
        self.controller
            .demand
            .lock()
            .expect("demand senders lock")
            .clear();
        for task in self.reconcilers {
            let _ = task.await;
        }
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

/// Starts every pool's reconciler and the control API. `worker_program` is the `llmctl` binary
/// the local provider runs as `llmctl worker`.
pub async fn start(config: ControllerConfig, worker_program: PathBuf) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let mut pools = BTreeMap::new();
    let mut senders = HashMap::new();
    let mut reconcilers = Vec::new();
    for spec in &config.pools {
        let (provider, events) =
            LocalProvider::new(local_config(spec, &worker_program, &config.log_dir));
        let (reconciler, status) = Reconciler::new(
            PoolConfig {
                name: spec.name.clone(),
                scaling: spec.scaling.clone(),
                tick: config.tick,
                drain_grace: spec.executor.drain_grace,
                terminal_ttl: spec.terminal_ttl,
                endpoint_concurrency: spec.executor.max_concurrency,
            },
            provider,
            metrics.clone(),
        );
        let (tx, rx) = mpsc::channel(256);
        senders.insert(spec.name.clone(), tx);
        reconcilers.push(tokio::spawn(reconciler.run(events, rx)));
        pools.insert(spec.name.clone(), Pool { status });
    }

    let (snapshot_tx, snapshot_rx) = watch::channel(EndpointSnapshot::default());
    let mut background = Vec::new();
    // One follower per pool keeps the endpoint snapshot current.
    let snapshot_tx = Arc::new(snapshot_tx);
    let statuses: Vec<watch::Receiver<PoolStatus>> =
        pools.values().map(|p| p.status.clone()).collect();
    for mut status in statuses.clone() {
        let snapshot_tx = snapshot_tx.clone();
        let all = statuses.clone();
        background.push(tokio::spawn(async move {
            loop {
                snapshot_tx.send_if_modified(|snap| {
                    let pools: BTreeMap<String, Vec<Endpoint>> = all
                        .iter()
                        .map(|s| {
                            let s = s.borrow();
                            (s.name.clone(), s.endpoints.clone())
                        })
                        .collect();
                    if pools == snap.pools {
                        return false;
                    }
                    snap.pools = pools;
                    snap.revision += 1;
                    true
                });
                if status.changed().await.is_err() {
                    return;
                }
            }
        }));
    }

    let controller = Arc::new(Controller {
        pools,
        demand: Mutex::new(senders),
        book: Mutex::new(DemandBook::new(config.demand_ttl)),
        origin: Instant::now(),
        endpoints: snapshot_rx,
        metrics,
    });
    // Quiet gateways expire even when nobody reports.
    background.push(tokio::spawn({
        let controller = controller.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                for pool in controller.pools.keys() {
                    controller.push_demand(pool);
                }
            }
        }
    }));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the control API on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    background.push(tokio::spawn(crate::api::serve(
        listener,
        controller.clone(),
    )));
    tracing::info!(%addr, pools = config.pools.len(), "controller listening");
    Ok(Running {
        addr,
        controller,
        reconcilers,
        background,
    })
}
