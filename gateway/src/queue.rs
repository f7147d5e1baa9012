//! The admission queue of one pool, as an actor: one task owns the waiting requests and the
//! pool's endpoint states; handlers talk to it through a [`QueueHandle`]. A request waits until
//! an endpoint has a free slot, then receives a [`Grant`] naming the endpoint; dropping the
//! grant's [`Permit`] frees the slot. The queue is bounded (full → refused at once), ordered by
//! priority class, fair between tenants within a class (round robin over tenants, so one
//! tenant's burst waits behind its own requests only), and every entry has a deadline. A client
//! that goes away cancels its entry at once (the waiting future's drop sends the cancel).

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{Endpoint, Priority, QueueConfig};
use crate::dispatch::{self, EndpointState, Outcome};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    #[error("the queue is full")]
    Full,
    #[error("no executor became available before the request's deadline")]
    Expired,
    #[error("the gateway is shutting down")]
    Closed,
}

/// A request's place in line.
pub struct Ticket {
    pub tenant: Arc<str>,
    pub priority: Priority,
    /// Prompt-prefix hash for affinity.
    pub affinity: Option<u64>,
    /// Endpoints this request already failed on (retries).
    pub avoid: Vec<String>,
    pub deadline: Instant,
    /// Retries go to the front of their tenant's line.
    pub retry: bool,
}

/// Permission to send one request to `endpoint`.
pub struct Grant {
    pub endpoint: Endpoint,
    pub permit: Permit,
}

/// Holds an endpoint slot; dropping it frees the slot (recording the outcome).
pub struct Permit {
    address: String,
    outcome: Outcome,
    tx: mpsc::UnboundedSender<Command>,
}

impl Permit {
    pub fn fail(&mut self) {
        self.outcome = Outcome::Failure;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Release {
            address: std::mem::take(&mut self.address),
            outcome: self.outcome,
        });
    }
}

enum Command {
    Enqueue {
        id: u64,
        ticket: Ticket,
        reply: oneshot::Sender<Result<Grant, QueueError>>,
    },
    Cancel(u64),
    Release {
        address: String,
        outcome: Outcome,
    },
    SetEndpoints(Vec<Endpoint>),
    Load(oneshot::Sender<Load>),
}

/// What the pool's queue holds now, for demand reports to the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub queued: usize,
    /// Requests granted and not yet finished.
    pub in_flight: usize,
    /// Outstanding requests per endpoint address (endpoints with none are left out).
    pub per_endpoint: Vec<(String, usize)>,
}

#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    depth: Arc<AtomicUsize>,
}

/// Cancels its entry if dropped before the grant arrives (the client went away).
struct CancelOnDrop {
    id: u64,
    tx: mpsc::UnboundedSender<Command>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Command::Cancel(self.id));
        }
    }
}

impl QueueHandle {
    pub fn spawn(
        pool: String,
        endpoints: Vec<Endpoint>,
        config: QueueConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let actor = Actor {
            pool,
            config,
            metrics,
            endpoints: Vec::new(),
            classes: Default::default(),
            where_is: HashMap::new(),
            deadlines: BinaryHeap::new(),
            len: 0,
            in_flight: 0,
            depth: depth.clone(),
            tx: tx.clone(),
        };
        let mut actor = actor;
        actor.endpoints = endpoints.into_iter().map(|e| actor.state(e)).collect();
        tokio::spawn(actor.run(rx));
        Self {
            tx,
            next_id: Arc::new(AtomicU64::new(0)),
            depth,
        }
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Waits in line for an endpoint slot.
    pub async fn acquire(&self, ticket: Ticket) -> Result<Grant, QueueError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Enqueue { id, ticket, reply })
            .map_err(|_| QueueError::Closed)?;
        let mut guard = CancelOnDrop {
            id,
            tx: self.tx.clone(),
            armed: true,
        };
        let result = answer.await.map_err(|_| QueueError::Closed)?;
        guard.armed = false;
        result
    }

    /// The queue's current load (`None` once the queue is gone).
    pub async fn load(&self) -> Option<Load> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Load(tx)).ok()?;
        rx.await.ok()
    }

    /// Replaces the pool's endpoints (live endpoint sets from the controller); state of
    /// endpoints that stay is kept.
    pub fn set_endpoints(&self, endpoints: Vec<Endpoint>) {
        let _ = self.tx.send(Command::SetEndpoints(endpoints));
    }
}

struct Waiting {
    id: u64,
    ticket: Ticket,
    reply: oneshot::Sender<Result<Grant, QueueError>>,
}

/// One priority class: per-tenant lines served round robin.
#[derive(Default)]
struct Class {
    lines: HashMap<Arc<str>, VecDeque<Waiting>>,
    rotation: VecDeque<Arc<str>>,
}

struct Actor {
    pool: String,
    config: QueueConfig,
    metrics: Arc<Metrics>,
    endpoints: Vec<EndpointState>,
    classes: [Class; 3],
    where_is: HashMap<u64, (usize, Arc<str>)>,
    deadlines: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    len: usize,
    /// Grants whose permits are not yet released.
    in_flight: usize,
    depth: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<Command>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            let next_deadline = self.deadlines.peek().map(|d| d.0.0);
            // Ejected endpoints come back on their own: wake then too.
            let next_probe = self.endpoints.iter().filter_map(|e| e.ejected_until).min();
            let wake = [next_deadline, next_probe].into_iter().flatten().min();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                () = sleep_until(wake) => {}
            }
            self.expire();
            self.dispatch();
            if self.depth.swap(self.len, Ordering::Relaxed) != self.len {
                self.metrics.queue_depth(&self.pool, self.len);
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Enqueue { id, ticket, reply } => {
                if self.len >= self.config.max_size {
                    let _ = reply.send(Err(QueueError::Full));
                    return;
                }
                let class = ticket.priority.index();
                let tenant = ticket.tenant.clone();
                self.deadlines
                    .push(std::cmp::Reverse((ticket.deadline, id)));
                self.where_is.insert(id, (class, tenant.clone()));
                let retry = ticket.retry;
                let c = &mut self.classes[class];
                let line = c.lines.entry(tenant.clone()).or_default();
                if line.is_empty() {
                    if retry {
                        c.rotation.push_front(tenant);
                    } else {
                        c.rotation.push_back(tenant);
                    }
                }
                let entry = Waiting { id, ticket, reply };
                if retry {
                    line.push_front(entry)
                } else {
                    line.push_back(entry)
                }
                self.len += 1;
            }
            Command::Cancel(id) => {
                if self.remove(id).is_some() {
                    self.metrics.queue_left(&self.pool, "client_gone");
                }
            }
            Command::Release { address, outcome } => {
                self.in_flight -= 1;
                let now = Instant::now();
                if let Some(e) = self
                    .endpoints
                    .iter_mut()
                    .find(|e| e.info.address == address)
                {
                    if e.finish(
                        outcome,
                        now,
                        self.config.eject_after_failures,
                        self.config.eject_cooldown,
                    ) {
                        tracing::warn!(pool = %self.pool, endpoint = %e.info.name, "endpoint ejected after repeated failures");
                        self.metrics.ejected(&self.pool, &e.info.name);
                    }
                    e.gauge.set(e.outstanding as i64);
                }
            }
            Command::SetEndpoints(list) => {
                let mut next = Vec::with_capacity(list.len());
                for info in list {
                    match self
                        .endpoints
                        .iter()
                        .position(|e| e.info.address == info.address)
                    {
                        Some(i) => {
                            let mut e = self.endpoints.swap_remove(i);
                            if e.info.name != info.name {
                                e.gauge = self.metrics.endpoint_gauge(&self.pool, &info.name);
                            }
                            e.info = info;
                            next.push(e);
                        }
                        None => next.push(self.state(info)),
                    }
                }
                self.endpoints = next;
            }
            Command::Load(reply) => {
                let _ = reply.send(Load {
                    queued: self.len,
                    in_flight: self.in_flight,
                    per_endpoint: self
                        .endpoints
                        .iter()
                        .filter(|e| e.outstanding > 0)
                        .map(|e| (e.info.address.clone(), e.outstanding))
                        .collect(),
                });
            }
        }
    }

    /// A new endpoint's state, with its in-flight gauge registered.
    fn state(&self, info: Endpoint) -> EndpointState {
        let gauge = self.metrics.endpoint_gauge(&self.pool, &info.name);
        EndpointState {
            gauge,
            ..EndpointState::new(info)
        }
    }

    fn remove(&mut self, id: u64) -> Option<Waiting> {
        let (class, tenant) = self.where_is.remove(&id)?;
        let c = &mut self.classes[class];
        let line = c.lines.get_mut(&tenant)?;
        let pos = line.iter().position(|w| w.id == id)?;
        let w = line.remove(pos);
        if line.is_empty() {
            c.lines.remove(&tenant);
            c.rotation.retain(|t| *t != tenant);
        }
        self.len -= 1;
        w
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(std::cmp::Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(w) = self.remove(id) {
                self.metrics.queue_left(&self.pool, "deadline");
                let _ = w.reply.send(Err(QueueError::Expired));
            }
        }
    }

    /// Hands out grants while the next request in line can be placed.
    fn dispatch(&mut self) {
        let now = Instant::now();
        'classes: for class in 0..self.classes.len() {
            loop {
                let c = &mut self.classes[class];
                let Some(tenant) = c.rotation.pop_front() else {
                    continue 'classes;
                };
                let line = c
                    .lines
                    .get_mut(&tenant)
                    .expect("rotation names tenants with a line");
                let head = line.front().expect("lines in the rotation are not empty");
                // A client already gone: drop it and look again.
                if head.reply.is_closed() {
                    let w = line.pop_front().expect("head exists");
                    self.after_pop(class, tenant, w.id);
                    self.metrics.queue_left(&self.pool, "client_gone");
                    continue;
                }
                let Some(i) = dispatch::choose(
                    &self.endpoints,
                    now,
                    head.ticket.affinity,
                    &head.ticket.avoid,
                ) else {
                    // Nothing free: put the tenant back where it was and stop.
                    self.classes[class].rotation.push_front(tenant);
                    return;
                };
                let w = line.pop_front().expect("head exists");
                self.after_pop(class, tenant, w.id);
                let e = &mut self.endpoints[i];
                e.outstanding += 1;
                self.in_flight += 1;
                e.gauge.set(e.outstanding as i64);
                let grant = Grant {
                    endpoint: e.info.clone(),
                    permit: Permit {
                        address: e.info.address.clone(),
                        outcome: Outcome::Success,
                        tx: self.tx.clone(),
                    },
                };
                // If the client left in between, dropping the grant releases the slot.
                let _ = w.reply.send(Ok(grant));
            }
        }
    }

    fn after_pop(&mut self, class: usize, tenant: Arc<str>, id: u64) {
        self.where_is.remove(&id);
        self.len -= 1;
        let c = &mut self.classes[class];
        if c.lines.get(&tenant).is_some_and(|l| !l.is_empty()) {
            c.rotation.push_back(tenant);
        } else {
            c.lines.remove(&tenant);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The deadline for a request entering the queue now.
pub fn deadline(config: &QueueConfig) -> Instant {
    Instant::now() + config.deadline
}

/// Retry-After for a refusal by a full or slow queue.
pub fn retry_after(config: &QueueConfig) -> Duration {
    (config.deadline / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_size: usize) -> QueueConfig {
        QueueConfig {
            max_size,
            deadline: Duration::from_secs(30),
            prefix_affinity: false,
            max_retries: 1,
            eject_after_failures: 3,
            eject_cooldown: Duration::from_secs(5),
        }
    }

    fn one_slot() -> Vec<Endpoint> {
        vec![Endpoint {
            name: "e0".into(),
            address: "127.0.0.1:1".into(),
            max_concurrency: 1,
        }]
    }

    fn ticket(tenant: &str, priority: Priority, deadline: Duration) -> Ticket {
        Ticket {
            tenant: Arc::from(tenant),
            priority,
            affinity: None,
            avoid: Vec::new(),
            deadline: Instant::now() + deadline,
            retry: false,
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Enqueues `tickets` in order, then releases grants one at a time; returns who got them.
    async fn serve_order(q: &QueueHandle, tickets: Vec<Ticket>) -> Vec<String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Occupy the only slot so everything queues.
        let blocker = q
            .acquire(ticket("blocker", Priority::High, Duration::from_secs(30)))
            .await
            .unwrap();
        for t in tickets {
            let (q, tx) = (q.clone(), tx.clone());
            let name = t.tenant.to_string();
            tokio::spawn(async move {
                let grant = q.acquire(t).await.unwrap();
                tx.send((name, grant)).unwrap();
            });
            settle().await;
        }
        drop(blocker);
        let mut order = Vec::new();
        while let Ok(Some((name, grant))) =
            tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
        {
            order.push(name);
            drop(grant);
        }
        order
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_from_one_tenant_does_not_delay_another_beyond_its_share() {
        let q = QueueHandle::spawn(
            "p".into(),
            one_slot(),
            config(100),
            Arc::new(Metrics::new()),
        );
        let mut tickets: Vec<Ticket> = (0..10)
            .map(|_| ticket("burst", Priority::Normal, Duration::from_secs(30)))
            .collect();
        tickets.extend((0..2).map(|_| ticket("calm", Priority::Normal, Duration::from_secs(30))));
        let order = serve_order(&q, tickets).await;
        assert_eq!(order.len(), 12);
        let calm: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, n)| *n == "calm")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(calm, vec![1, 3], "round robin between tenants: {order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn higher_classes_go_first() {
        let q = QueueHandle::spawn(
            "p".into(),
            one_slot(),
            config(100),
            Arc::new(Metrics::new()),
        );
        let tickets = vec![
            ticket("low", Priority::Low, Duration::from_secs(30)),
            ticket("normal", Priority::Normal, Duration::from_secs(30)),
            ticket("high", Priority::High, Duration::from_secs(30)),
        ];
        assert_eq!(
            serve_order(&q, tickets).await,
            vec!["high", "normal", "low"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_expire_and_a_full_queue_refuses_at_once() {
        let q = QueueHandle::spawn("p".into(), Vec::new(), config(2), Arc::new(Metrics::new()));
        let waiting = tokio::spawn({
            let q = q.clone();
            async move {
                q.acquire(ticket("a", Priority::Normal, Duration::from_secs(5)))
                    .await
            }
        });
        let second = tokio::spawn({
            let q = q.clone();
            async move {
                q.acquire(ticket("a", Priority::Normal, Duration::from_secs(60)))
                    .await
            }
        });
        settle().await;
        assert_eq!(q.depth(), 2);
        let started = Instant::now();
        assert_eq!(
            q.acquire(ticket("b", Priority::High, Duration::from_secs(60)))
                .await
                .err(),
            Some(QueueError::Full)
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        let result = waiting.await.unwrap();
        assert_eq!(result.err(), Some(QueueError::Expired));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        settle().await;
        assert_eq!(q.depth(), 1);
        // Endpoints arriving later (scale from zero) serve what still waits.
        q.set_endpoints(one_slot());
        assert!(second.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_is_dropped_from_the_queue_at_once() {
        let q = QueueHandle::spawn("p".into(), one_slot(), config(10), Arc::new(Metrics::new()));
        let _blocker = q
            .acquire(ticket("x", Priority::Normal, Duration::from_secs(30)))
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let q = q.clone();
            async move {
                q.acquire(ticket("y", Priority::Normal, Duration::from_secs(30)))
                    .await
            }
        });
        settle().await;
        assert_eq!(q.depth(), 1);
        waiting.abort();
        settle().await;
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_and_its_slot_goes_elsewhere() {
        let endpoints = vec![
            Endpoint {
                name: "bad".into(),
                address: "127.0.0.1:1".into(),
                max_concurrency: 4,
            },
            Endpoint {
                name: "good".into(),
                address: "127.0.0.1:2".into(),
                max_concurrency: 4,
            },
        ];
        let q = QueueHandle::spawn("p".into(), endpoints, config(10), Arc::new(Metrics::new()));
        for _ in 0..3 {
            // Least outstanding with ties to the first: "bad" is chosen, and fails.
            let mut g = q
                .acquire(ticket("a", Priority::Normal, Duration::from_secs(30)))
                .await
                .unwrap();
            assert_eq!(g.endpoint.name, "bad");
            g.permit.fail();
        }
        settle().await;
        for _ in 0..3 {
            assert_eq!(
                q.acquire(ticket("a", Priority::Normal, Duration::from_secs(30)))
                    .await
                    .unwrap()
                    .endpoint
                    .name,
                "good"
            );
        }
    }
}
