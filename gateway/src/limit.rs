//! Per-tenant rate limits: requests per minute through governor (GCRA), and tokens per minute
//! through a token bucket that can be charged up front (estimated prompt tokens plus
//! `max_tokens`) and trued up when the real `usage` is known — refunds included, which
//! governor's cells cannot express. Also writes OpenAI's `x-ratelimit-*` headers.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

type Rpm = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub kind: LimitKind,
    pub retry_after: Duration,
    /// The request can never fit (it asks more tokens than a minute allows).
    pub never: bool,
    /// The limits' state at the refusal, for the response headers.
    pub snapshot: Snapshot,
}

/// Remaining capacity after admission, for the response headers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub requests: Option<(u32, u32, Duration)>,
    pub tokens: Option<(u32, u32, Duration)>,
}

/// A bucket of `capacity` tokens refilled at `capacity` per minute. The balance may go
/// negative when a request used more than it was charged.
struct Bucket {
    capacity: f64,
    balance: f64,
    updated: Instant,
}

impl Bucket {
    fn rate(&self) -> f64 {
        self.capacity / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.balance = (self.balance + dt * self.rate()).min(self.capacity);
        self.updated = now;
    }

    fn until_full(&self) -> Duration {
        Duration::from_secs_f64(((self.capacity - self.balance) / self.rate()).max(0.0))
    }
}

pub struct TenantLimits {
    rpm: Option<(u32, Rpm)>,
    tpm: Option<Mutex<Bucket>>,
}

impl TenantLimits {
    pub fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u32>) -> Self {
        let rpm = requests_per_minute.and_then(NonZeroU32::new).map(|n| {
            (
                n.get(),
                RateLimiter::direct(Quota::per_minute(n))
                    .with_middleware::<StateInformationMiddleware>(),
            )
        });
        let tpm = tokens_per_minute.map(|n| {
            Mutex::new(Bucket {
                capacity: n as f64,
                balance: n as f64,
                updated: Instant::now(),
            })
        });
        Self { rpm, tpm }
    }

    /// Same configured limits (used on reload to keep live state).
    pub fn matches(&self, rpm: Option<u32>, tpm: Option<u32>) -> bool {
        self.rpm.as_ref().map(|r| r.0) == rpm
            && self
                .tpm
                .as_ref()
                .map(|b| b.lock().expect("bucket lock").capacity as u32)
                == tpm
    }

    /// Admits a request charged `tokens`, or says which limit refuses it and for how long.
    pub fn admit(&self, tokens: u32) -> Result<Snapshot, Refusal> {
        let mut snap = Snapshot::default();
        // Tokens first: a refusal there must not consume a request cell.
        if let Some(bucket) = &self.tpm {
            let mut b = bucket.lock().expect("bucket lock is never poisoned");
            b.refill(Instant::now());
            let need = tokens as f64;
            let state = |b: &Bucket, reset: Duration| Snapshot {
                requests: None,
                tokens: Some((b.capacity as u32, b.balance.max(0.0) as u32, reset)),
            };
            if need > b.capacity {
                return Err(Refusal {
                    kind: LimitKind::Tokens,
                    retry_after: Duration::from_secs(60),
                    never: true,
                    snapshot: state(&b, b.until_full()),
                });
            }
            if b.balance < need {
                let wait = Duration::from_secs_f64((need - b.balance) / b.rate());
                return Err(Refusal {
                    kind: LimitKind::Tokens,
                    retry_after: wait,
                    never: false,
                    snapshot: state(&b, wait),
                });
            }
            b.balance -= need;
            snap.tokens = Some((b.capacity as u32, b.balance.max(0.0) as u32, b.until_full()));
        }
        if let Some((limit, rl)) = &self.rpm {
            match rl.check() {
                Ok(state) => {
                    let remaining = state.remaining_burst_capacity();
                    let reset =
                        Duration::from_secs_f64((*limit - remaining) as f64 * 60.0 / *limit as f64);
                    snap.requests = Some((*limit, remaining, reset));
                }
                Err(not_until) => {
                    // Give back the tokens charged above.
                    self.true_up(tokens, 0);
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    snap.requests = Some((*limit, 0, wait));
                    if let (Some(bucket), Some(t)) = (&self.tpm, snap.tokens.as_mut()) {
                        let b = bucket.lock().expect("bucket lock is never poisoned");
                        t.1 = b.balance.max(0.0) as u32;
                        t.2 = b.until_full();
                    }
                    return Err(Refusal {
                        kind: LimitKind::Requests,
                        retry_after: wait,
                        never: false,
                        snapshot: snap,
                    });
                }
            }
        }
        Ok(snap)
    }

    /// Settles a request charged `charged` tokens that used `actual`.
    pub fn true_up(&self, charged: u32, actual: u32) {
        if let Some(bucket) = &self.tpm {
            let mut b = bucket.lock().expect("bucket lock is never poisoned");
            b.refill(Instant::now());
            b.balance = (b.balance + charged as f64 - actual as f64).min(b.capacity);
        }
    }

    /// Tokens available now (for tests and headers).
    pub fn tokens_remaining(&self) -> Option<f64> {
        self.tpm.as_ref().map(|b| {
            let mut b = b.lock().expect("bucket lock is never poisoned");
            b.refill(Instant::now());
            b.balance
        })
    }
}

fn duration_header(d: Duration) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 32];
    let mut w = &mut buf[..];
    let ms = d.as_millis();
    let written = if ms < 1000 {
        write!(w, "{ms}ms")
    } else {
        write!(w, "{:.3}s", d.as_secs_f64())
    };
    let len = 32 - w.len();
    match written {
        Ok(()) => HeaderValue::from_bytes(&buf[..len]).expect("durations format as ASCII"),
        Err(_) => HeaderValue::from_static("0ms"),
    }
}

/// Writes OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
pub fn write_headers(headers: &mut HeaderMap, snap: &Snapshot) {
    use http::HeaderName;
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    for (names, entry) in NAMES.iter().zip([&snap.requests, &snap.tokens]) {
        if let Some((limit, remaining, reset)) = entry {
            let [l, r, t] = names.clone();
            headers.insert(l, HeaderValue::from(*limit));
            headers.insert(r, HeaderValue::from(*remaining));
            headers.insert(t, duration_header(*reset));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_charges_up_front_refills_and_trues_up() {
        let l = TenantLimits::new(None, Some(600)); // 10 tokens per second
        assert!(l.admit(500).is_ok());
        let refusal = l.admit(200).unwrap_err();
        assert_eq!(refusal.kind, LimitKind::Tokens);
        // 100 left, 100 more needed at 10/s.
        assert!(
            (refusal.retry_after.as_secs_f64() - 10.0).abs() < 0.01,
            "{refusal:?}"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(l.admit(200).is_ok());
        // The 500-token request used only 50: 450 come back.
        l.true_up(500, 50);
        assert!((l.tokens_remaining().unwrap() - 450.0).abs() < 0.5);
        // A request that used more than charged drives the balance down.
        l.true_up(10, 1000);
        assert!(l.tokens_remaining().unwrap() < 0.0);
        assert!(l.admit(1).is_err());
        assert!(
            l.admit(601).unwrap_err().never,
            "more than a minute's worth never fits"
        );
    }

    #[test]
    fn requests_per_minute_refuse_past_the_burst() {
        let l = TenantLimits::new(Some(2), Some(1000));
        let first = l.admit(10).unwrap();
        assert_eq!(first.requests.unwrap().1, 1);
        l.admit(10).unwrap();
        let r = l.admit(10).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        assert!(r.retry_after > Duration::from_secs(20));
        assert!(
            (l.tokens_remaining().unwrap() - 980.0).abs() < 1.0,
            "a refused request is not charged tokens"
        );
    }
}
