//! The admission queue of one pool. A request waits until an endpoint has a free slot, then
//! receives a [`Grant`] naming the endpoint; dropping the grant's [`Permit`] frees the slot. The
//! queue is bounded (full → refused at once), ordered by priority class, fair between tenants
//! within a class (round robin over tenants, so one tenant's burst waits behind its own requests
//! only), and every entry has a deadline. A client that goes away cancels its entry at once (the
//! waiting future's drop removes it).
//!
//! The state sits behind one mutex, held only for short bookkeeping: a request that finds
//! nobody ahead of it and a free slot is granted on the spot, and a released slot is handed to
//! the next in line by the releasing thread. A timer task expires deadlines and lets ejected
//! endpoints back when their cool-down ends. Grants that could not be delivered (the client had
//! just left) are dropped only after the lock is released, since dropping one releases its slot.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
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
    /// What the request weighs, for the token demand the controller scales on.
    pub tokens: Tokens,
    /// Bytes it holds while it waits (its body): the queue is bounded in bytes too.
    pub bytes: usize,
}

/// A request's estimated token weight: its prompt, and the decode tokens it may generate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub decode: u64,
}

impl Tokens {
    fn add(&mut self, other: Tokens) {
        self.prompt += other.prompt;
        self.decode += other.decode;
    }

    fn sub(&mut self, other: Tokens) {
        self.prompt = self.prompt.saturating_sub(other.prompt);
        self.decode = self.decode.saturating_sub(other.decode);
    }
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
    tokens: Tokens,
    inner: Arc<Inner>,
}

impl Permit {
    pub fn fail(&mut self) {
        self.outcome = Outcome::Failure;
    }

    /// The upstream asked for a pause (a provider's 429): it gets nothing new for `wait`.
    pub fn throttle(&mut self, wait: Duration) {
        self.outcome = Outcome::Throttled(wait);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let address = std::mem::take(&mut self.address);
        let undelivered = {
            let mut s = self.inner.lock();
            let ejected = s.release(&address, self.outcome, self.tokens);
            let undelivered = s.dispatch(&self.inner);
            s.publish_depth(&self.inner);
            if ejected {
                self.inner.wake.notify_one();
            }
            undelivered
        };
        drop(undelivered);
    }
}

/// What the pool's queue holds now, for demand reports to the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub queued: usize,
    /// Requests granted and not yet finished.
    pub in_flight: usize,
    /// Outstanding requests per endpoint address (endpoints with none are left out).
    pub per_endpoint: Vec<(String, usize)>,
    /// Token weight of the queued and in-flight requests.
    pub tokens: Tokens,
    /// Admitted since the queue started, retries left out: the reporter turns these into rates.
    pub arrived: Arrived,
}

/// Requests admitted and their token weight, counted since the queue started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Arrived {
    pub requests: u64,
    pub tokens: Tokens,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the timer (a new deadline, an ejection).
    wake: Notify,
    next_id: AtomicU64,
    depth: AtomicUsize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough bookkeeping; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
pub struct QueueHandle {
    inner: Arc<Inner>,
}

/// Removes its entry if dropped before the grant arrives (the client went away).
struct CancelOnDrop {
    id: u64,
    inner: Arc<Inner>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let mut s = self.inner.lock();
            if s.remove(self.id).is_some() {
                s.metrics.queue_left(&s.pool, "client_gone");
            }
            s.publish_depth(&self.inner);
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
        let mut state = State {
            pool,
            config,
            metrics,
            endpoints: Vec::new(),
            classes: Default::default(),
            where_is: HashMap::new(),
            deadlines: BinaryHeap::new(),
            len: 0,
            in_flight: 0,
            tokens: Tokens::default(),
            bytes: 0,
            arrived: Arrived::default(),
        };
        state.endpoints = endpoints.into_iter().map(|e| state.state(e)).collect();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            wake: Notify::new(),
            next_id: AtomicU64::new(0),
            depth: AtomicUsize::new(0),
        });
        tokio::spawn(timer(inner.clone()));
        Self { inner }
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    /// Waits in line for an endpoint slot (or takes one at once when nobody is waiting).
    pub async fn acquire(&self, ticket: Ticket) -> Result<Grant, QueueError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let answer = {
            let mut s = self.inner.lock();
            if !ticket.retry {
                s.arrived.requests += 1;
                s.arrived.tokens.add(ticket.tokens);
            }
            if s.len == 0 && ticket.deadline > Instant::now() {
                let now = Instant::now();
                if let Some(i) = dispatch::choose(&s.endpoints, now, ticket.affinity, &ticket.avoid)
                {
                    s.tokens.add(ticket.tokens);
                    return Ok(s.grant(i, ticket.tokens, &self.inner));
                }
            }
            if s.len >= s.config.max_size
                || s.bytes.saturating_add(ticket.bytes) > s.config.max_bytes
            {
                return Err(QueueError::Full);
            }
            // One tenant holds at most its share of the queue, so a burst of its own cannot
            // shut the others out (a retry was admitted already and keeps its place).
            let share = (s.config.tenant_share * s.config.max_size as f64).ceil() as usize;
            if !ticket.retry && s.queued_by(&ticket.tenant) >= share.max(1) {
                return Err(QueueError::Full);
            }
            let (reply, answer) = oneshot::channel();
            s.enqueue(id, ticket, reply);
            // Normally nothing is free here (others are waiting), but an ejected endpoint's
            // probe may be due.
            let undelivered = s.dispatch(&self.inner);
            s.publish_depth(&self.inner);
            (answer, undelivered)
        };
        let (answer, undelivered) = answer;
        drop(undelivered);
        self.inner.wake.notify_one();
        let mut guard = CancelOnDrop {
            id,
            inner: self.inner.clone(),
            armed: true,
        };
        let result = answer.await.map_err(|_| QueueError::Closed)?;
        guard.armed = false;
        result
    }

    /// The queue's current load.
    pub fn load(&self) -> Load {
        let s = self.inner.lock();
        Load {
            queued: s.len,
            in_flight: s.in_flight,
            per_endpoint: s
                .endpoints
                .iter()
                .filter(|e| e.outstanding > 0)
                .map(|e| (e.info.address.clone(), e.outstanding))
                .collect(),
            tokens: s.tokens,
            arrived: s.arrived,
        }
    }

    /// Replaces the pool's endpoints (live endpoint sets from the controller); state of
    /// endpoints that stay is kept. Requests waiting for a slot get the new ones at once.
    pub fn set_endpoints(&self, endpoints: Vec<Endpoint>) {
        let undelivered = {
            let mut s = self.inner.lock();
            let mut next = Vec::with_capacity(endpoints.len());
            for info in endpoints {
                match s
                    .endpoints
                    .iter()
                    .position(|e| e.info.address == info.address)
                {
                    Some(i) => {
                        let mut e = s.endpoints.swap_remove(i);
                        if e.info.name != info.name {
                            s.metrics.remove_endpoint_gauge(&s.pool, &e.info.name);
                            e.gauge = s.metrics.endpoint_gauge(&s.pool, &info.name);
                        }
                        e.info = info;
                        next.push(e);
                    }
                    None => {
                        let e = s.state(info);
                        next.push(e);
                    }
                }
            }
            // Endpoints that left: their series go with them (requests still running there
            // keep a detached gauge).
            for gone in std::mem::replace(&mut s.endpoints, next) {
                s.metrics.remove_endpoint_gauge(&s.pool, &gone.info.name);
            }
            let undelivered = s.dispatch(&self.inner);
            s.publish_depth(&self.inner);
            undelivered
        };
        drop(undelivered);
        self.inner.wake.notify_one();
    }
}

/// Expires deadlines and lets ejected endpoints back on time.
async fn timer(inner: Arc<Inner>) {
    loop {
        let notified = inner.wake.notified();
        let (wake, undelivered) = {
            let mut s = inner.lock();
            s.expire();
            let undelivered = s.dispatch(&inner);
            s.publish_depth(&inner);
            let next_deadline = s.deadlines.peek().map(|d| d.0.0);
            // Ejected endpoints come back on their own: wake then too.
            let next_probe = s.endpoints.iter().filter_map(|e| e.ejected_until).min();
            let wake = [next_deadline, next_probe].into_iter().flatten().min();
            (wake, undelivered)
        };
        drop(undelivered);
        tokio::select! {
            () = notified => {}
            () = sleep_until(wake) => {}
        }
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

struct State {
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
    /// Token weight of the waiting requests and of the grants not yet released.
    tokens: Tokens,
    /// Bytes the waiting requests hold.
    bytes: usize,
    arrived: Arrived,
}

impl State {
    fn enqueue(
        &mut self,
        id: u64,
        ticket: Ticket,
        reply: oneshot::Sender<Result<Grant, QueueError>>,
    ) {
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
        self.tokens.add(ticket.tokens);
        self.bytes += ticket.bytes;
        let entry = Waiting { id, ticket, reply };
        if retry {
            line.push_front(entry)
        } else {
            line.push_back(entry)
        }
        self.len += 1;
    }

    /// Frees a slot of `address`; true when this outcome ejected the endpoint.
    fn release(&mut self, address: &str, outcome: Outcome, tokens: Tokens) -> bool {
        self.in_flight -= 1;
        self.tokens.sub(tokens);
        let now = Instant::now();
        let Some(e) = self
            .endpoints
            .iter_mut()
            .find(|e| e.info.address == address)
        else {
            return false;
        };
        let ejected = e.finish(
            outcome,
            now,
            self.config.eject_after_failures,
            self.config.eject_cooldown,
        );
        if let Outcome::Throttled(wait) = outcome {
            tracing::info!(pool = %self.pool, endpoint = %e.info.name, ?wait, "upstream asked for a pause (429): cooled down");
        } else if ejected {
            tracing::warn!(pool = %self.pool, endpoint = %e.info.name, "endpoint ejected after repeated failures");
            self.metrics.ejected(&self.pool, &e.info.name);
        }
        e.gauge.set(e.outstanding as i64);
        ejected
    }

    /// Takes a slot of endpoint `i` for a request weighing `tokens` (already counted in
    /// `self.tokens`; the permit gives them back).
    fn grant(&mut self, i: usize, tokens: Tokens, inner: &Arc<Inner>) -> Grant {
        let e = &mut self.endpoints[i];
        e.outstanding += 1;
        e.gauge.set(e.outstanding as i64);
        self.in_flight += 1;
        Grant {
            endpoint: e.info.clone(),
            permit: Permit {
                address: e.info.address.clone(),
                outcome: Outcome::Success,
                tokens,
                inner: inner.clone(),
            },
        }
    }

    fn publish_depth(&self, inner: &Inner) {
        if inner.depth.swap(self.len, Ordering::Relaxed) != self.len {
            self.metrics.queue_depth(&self.pool, self.len);
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
        if let Some(w) = &w {
            self.tokens.sub(w.ticket.tokens);
            self.bytes -= w.ticket.bytes;
        }
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

    /// Hands out grants while the next request in line can be placed. Returns the grants
    /// whose clients had just gone: the caller drops them after unlocking (dropping one frees
    /// its slot, which takes the lock).
    fn dispatch(&mut self, inner: &Arc<Inner>) -> Vec<Grant> {
        let now = Instant::now();
        let mut undelivered = Vec::new();
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
                    self.after_pop(class, tenant, &w);
                    self.tokens.sub(w.ticket.tokens);
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
                    return undelivered;
                };
                let w = line.pop_front().expect("head exists");
                self.after_pop(class, tenant, &w);
                let grant = self.grant(i, w.ticket.tokens, inner);
                if let Err(Ok(grant)) = w.reply.send(Ok(grant)) {
                    undelivered.push(grant);
                }
            }
        }
        undelivered
    }

    /// Requests of `tenant` waiting, in every class.
    fn queued_by(&self, tenant: &str) -> usize {
        self.classes
            .iter()
            .filter_map(|c| c.lines.get(tenant))
            .map(VecDeque::len)
            .sum()
    }

    fn after_pop(&mut self, class: usize, tenant: Arc<str>, w: &Waiting) {
        self.where_is.remove(&w.id);
        self.len -= 1;
        self.bytes -= w.ticket.bytes;
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
            max_bytes: 1 << 30,
            tenant_share: 1.0,
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
            draining: false,
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
            tokens: Tokens::default(),
            bytes: 0,
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Enqueues `tickets` in order, then releases grants one at a time; returns who got them.
    async fn serve_order(q: &QueueHandle, tickets: Vec<Ticket>) -> Vec<String> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
        let metrics = Arc::new(Metrics::new());
        let q = QueueHandle::spawn("p".into(), Vec::new(), config(2), metrics.clone());
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
        let granted = second.await.unwrap().unwrap();
        // An executor that leaves the set takes its in-flight series with it, even with a
        // request still running there.
        assert!(metrics.encode().contains("endpoint=\"e0\"} 1"));
        q.set_endpoints(Vec::new());
        assert!(
            !metrics.encode().contains("endpoint=\"e0\""),
            "{}",
            metrics.encode()
        );
        drop(granted);
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
    async fn one_tenant_holds_at_most_its_share_of_the_queue() {
        let mut c = config(4);
        c.tenant_share = 0.5;
        let q = QueueHandle::spawn("p".into(), one_slot(), c, Arc::new(Metrics::new()));
        let of = |tenant: &'static str| ticket(tenant, Priority::Normal, Duration::from_secs(30));
        let _held = q.acquire(of("x")).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let q = q.clone();
            waiting.push(tokio::spawn(async move { q.acquire(of("x")).await }));
        }
        settle().await;
        assert_eq!(q.depth(), 2);
        // Its third waiting request would pass half of the queue.
        assert!(matches!(q.acquire(of("x")).await, Err(QueueError::Full)));
        // Another tenant still gets in.
        let other = tokio::spawn({
            let q = q.clone();
            async move { q.acquire(of("y")).await }
        });
        settle().await;
        assert_eq!(q.depth(), 3);
        other.abort();
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_in_bytes_as_well_as_entries() {
        let mut c = config(100);
        c.max_bytes = 1000;
        let q = QueueHandle::spawn("p".into(), one_slot(), c, Arc::new(Metrics::new()));
        let sized = |bytes| Ticket {
            bytes,
            ..ticket("x", Priority::Normal, Duration::from_secs(30))
        };
        // The slot is taken at once (nothing waits, nothing counted).
        let _held = q.acquire(sized(5000)).await.unwrap();
        let first = tokio::spawn({
            let q = q.clone();
            async move { q.acquire(sized(600)).await }
        });
        settle().await;
        assert_eq!(q.depth(), 1);
        // 600 + 600 bytes waiting would pass the bound: refused at once, as a full queue.
        assert!(matches!(q.acquire(sized(600)).await, Err(QueueError::Full)));
        assert!(!first.is_finished());
        // A smaller one fits beside it.
        let second = tokio::spawn({
            let q = q.clone();
            async move { q.acquire(sized(400)).await }
        });
        settle().await;
        assert_eq!(q.depth(), 2);
        // Leaving gives the bytes back.
        first.abort();
        second.abort();
        settle().await;
        assert_eq!(q.depth(), 0);
        let third = tokio::spawn({
            let q = q.clone();
            async move { q.acquire(sized(1000)).await }
        });
        settle().await;
        assert_eq!(
            q.depth(),
            1,
            "the bytes of the requests that left were given back"
        );
        third.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn token_weight_follows_requests_through_queue_grant_and_release() {
        let q = QueueHandle::spawn("p".into(), one_slot(), config(10), Arc::new(Metrics::new()));
        let weigh = |prompt, decode, retry| Ticket {
            tokens: Tokens { prompt, decode },
            retry,
            ..ticket("x", Priority::Normal, Duration::from_secs(30))
        };
        let held = q.acquire(weigh(100, 10, false)).await.unwrap();
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.acquire(weigh(7, 3, false)).await }
        });
        let gone = tokio::spawn({
            let q = q.clone();
            async move { q.acquire(weigh(1000, 1000, true)).await }
        });
        settle().await;
        let load = q.load();
        assert_eq!(
            load.tokens,
            Tokens {
                prompt: 1107,
                decode: 1013
            }
        );
        assert_eq!(
            (load.arrived.requests, load.arrived.tokens),
            (
                2,
                Tokens {
                    prompt: 107,
                    decode: 13
                }
            ),
            "retries are not arrivals"
        );
        // A client that leaves takes its weight with it; a release hands the slot on.
        gone.abort();
        settle().await;
        assert_eq!(
            q.load().tokens,
            Tokens {
                prompt: 107,
                decode: 13
            }
        );
        drop(held);
        let next = waiting.await.unwrap().unwrap();
        assert_eq!(
            q.load().tokens,
            Tokens {
                prompt: 7,
                decode: 3
            }
        );
        drop(next);
        assert_eq!(q.load().tokens, Tokens::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_and_its_slot_goes_elsewhere() {
        let endpoints = vec![
            Endpoint {
                name: "bad".into(),
                address: "127.0.0.1:1".into(),
                max_concurrency: 4,
                draining: false,
            },
            Endpoint {
                name: "good".into(),
                address: "127.0.0.1:2".into(),
                max_concurrency: 4,
                draining: false,
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
