//! Leader election on a coordination `Lease`, so several controller replicas can run and exactly
//! one of them drives the pools. A candidate takes the lease when it is free, released, or not
//! renewed for its duration; the holder renews it every `retry_period` and gives up leading when
//! it could not renew for `renew_deadline` (each attempt cut off at that deadline) or sees another
//! holder, after which the process
//! exits and restarts as a candidate. Expiry is judged by this replica's own clock from when it
//! last saw the lease record change (as client-go does), so clock skew between nodes does not
//! matter. Writes use the lease's `resourceVersion`, so two candidates never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// The Lease's name (in the controller's namespace).
    pub lease: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a lease not renewed stays taken.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops leading (shorter than the duration,
    /// so it stops before anyone else may start).
    pub renew_deadline: Duration,
    /// Time between attempts to take or renew.
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(lease: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            lease: lease.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What one attempt to take or renew the lease found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease.
    Held,
    /// Another replica holds it and its term has not run out.
    HeldBy(String),
    /// The lease changed between reading and writing it (409): try again.
    Raced,
}

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    /// The last lease record seen (holder, renew time, version) and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, config: LeaderConfig) -> Self {
        Self {
            api,
            config,
            observed: None,
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.config.lease, identity = %self.config.identity, "elected leader");
                    return;
                }
                Ok(Attempt::HeldBy(_) | Attempt::Raced) => {}
                Err(e) => tracing::warn!(lease = %self.config.lease, "leader election: {e}"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// One attempt to take the lease, or to renew it when this replica holds it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let c = &self.config;
        let now = MicroTime(Timestamp::now());
        let duration_secs = c.lease_duration.as_secs().max(1) as i32;
        let Some(lease) = self.api.get_opt(&c.lease).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(c.lease.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(c.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return written(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!(
            "{holder}|{:?}|{:?}",
            spec.renew_time.as_ref().map(|t| t.0),
            lease.metadata.resource_version
        );
        if self.observed.as_ref().is_none_or(|(r, _)| *r != record) {
            self.observed = Some((record, Instant::now()));
        }
        let ours = holder == c.identity;
        if !holder.is_empty() && !ours {
            let held_for = spec
                .lease_duration_seconds
                .map_or(c.lease_duration, |s| Duration::from_secs(s.max(0) as u64));
            let seen = self
                .observed
                .as_ref()
                .map(|(_, at)| *at)
                .expect("observed above");
            if seen.elapsed() < held_for {
                return Ok(Attempt::HeldBy(holder));
            }
            tracing::info!(lease = %c.lease, previous = %holder, "lease expired; taking it over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let updated = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(LeaseSpec {
                holder_identity: Some(c.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: if ours {
                    spec.acquire_time
                } else {
                    Some(now.clone())
                },
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        };
        written(
            self.api
                .replace(&c.lease, &PostParams::default(), &updated)
                .await,
        )
    }

    /// Keeps renewing in the background; [`Leadership::lost`] resolves when leading ends: at
    /// once when another replica is seen holding the lease, else when no renewal succeeded for
    /// `renew_deadline`. Each attempt is cut off at what is left of that deadline, so a stalled
    /// API call cannot keep this replica leading past the lease (client-go does the same).
    pub fn keep(mut self) -> Leadership {
        let (lost_tx, lost) = oneshot::channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let deadline = self.config.renew_deadline;
            let mut renewed = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.retry_period) => {}
                    _ = &mut stopped => return self,
                }
                let left = deadline.saturating_sub(renewed.elapsed());
                let lease = self.config.lease.clone();
                match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                    Ok(Ok(Attempt::Held)) => renewed = Instant::now(),
                    Ok(Ok(Attempt::HeldBy(other))) => {
                        let _ = lost_tx.send(format!("replica {other} holds the lease"));
                        return self;
                    }
                    Ok(Ok(Attempt::Raced)) => {
                        tracing::warn!(%lease, "the lease changed while renewing it; retrying")
                    }
                    Ok(Err(e)) => tracing::warn!(%lease, "renewing the lease: {e}"),
                    Err(_) => tracing::warn!(%lease, "renewing the lease timed out"),
                }
                if renewed.elapsed() >= deadline {
                    let _ = lost_tx.send(format!(
                        "could not renew the lease for {}s",
                        deadline.as_secs()
                    ));
                    return self;
                }
            }
        });
        Leadership { lost, stop, task }
    }

    /// Gives the lease up (holder cleared), so another replica takes over at once instead of
    /// waiting out the duration.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.config.lease).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let released = Lease {
            metadata: lease.metadata,
            spec: Some(spec),
        };
        written(
            self.api
                .replace(&self.config.lease, &PostParams::default(), &released)
                .await,
        )
        .map(|_| ())
    }
}

/// A write that went through holds the lease; one that lost a race (409) did not.
fn written(result: Result<Lease, kube::Error>) -> Result<Attempt, kube::Error> {
    match result {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Raced),
        Err(e) => Err(e),
    }
}

/// Held leadership, renewed in the background.
pub struct Leadership {
    lost: oneshot::Receiver<String>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Elector>,
}

impl Leadership {
    /// Resolves with the reason when this replica stops leading.
    pub async fn lost(&mut self) -> String {
        (&mut self.lost)
            .await
            .unwrap_or_else(|_| "renewal stopped".to_owned())
    }

    /// Stops renewing and releases the lease.
    pub async fn release(self) {
        let _ = self.stop.send(());
        if let Ok(elector) = self.task.await {
            let _ = elector.release().await;
        }
    }
}
