//! What a pool's requests actually generate, so that the demand the gateway reports carries
//! expected decode tokens rather than each request's `max_tokens` ceiling: clients often set it
//! far above what they get, or leave it out (then the gateway can only assume
//! [`DEFAULT_MAX_TOKENS`]). Kept here, beside the demand report it feeds, so that the gateway
//! and the controller's trace replay estimate with the same code.

use std::sync::Mutex;

/// `max_tokens` assumed for a request that gives none (its up-front rate-limit charge and the
/// ceiling of its expected decode).
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// Finished requests it takes before the history is trusted over `max_tokens` alone.
pub const MIN_SAMPLES: u64 = 16;

/// The mean follows about the last this many requests (an exponentially weighted mean; before
/// that many, the plain mean of all so far).
const WINDOW: u64 = 64;

/// Completion tokens per choice of a pool's finished requests.
#[derive(Debug, Default)]
pub struct DecodeHistory {
    mean: Mutex<(f64, u64)>,
}

impl DecodeHistory {
    /// A request finished with `completion_tokens` over `choices` choices (its usage report).
    pub fn record(&self, completion_tokens: u64, choices: u32) {
        let per_choice = completion_tokens as f64 / f64::from(choices.max(1));
        let mut guard = self.mean.lock().unwrap_or_else(|p| p.into_inner());
        let (mean, samples) = &mut *guard;
        *samples += 1;
        *mean += (per_choice - *mean) / (*samples).min(WINDOW) as f64;
    }

    /// Decode tokens a request is expected to generate: for each choice its ceiling
    /// (`max_tokens`, or `default` when it names none), lowered to what the pool's recent
    /// requests generated per choice once [`MIN_SAMPLES`] have finished. Requests cut short by
    /// a small `max_tokens` count as what they generated, so a pool whose clients ask for short
    /// answers is expected to give short ones.
    pub fn expect(&self, max_tokens: Option<u32>, default: u32, choices: u32) -> u32 {
        let ceiling = max_tokens.unwrap_or(default);
        let (mean, samples) = *self.mean.lock().unwrap_or_else(|p| p.into_inner());
        let per_choice = if samples >= MIN_SAMPLES {
            ceiling.min(mean.ceil() as u32)
        } else {
            ceiling
        };
        per_choice.saturating_mul(choices.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_stands_until_enough_requests_have_finished() {
        let h = DecodeHistory::default();
        assert_eq!(h.expect(None, 512, 1), 512);
        for _ in 0..MIN_SAMPLES - 1 {
            h.record(40, 1);
        }
        assert_eq!(h.expect(Some(1000), 512, 2), 2000);
        h.record(40, 1);
        assert_eq!(h.expect(Some(1000), 512, 2), 80);
        assert_eq!(h.expect(None, 512, 1), 40);
        // History lowers the ceiling, never raises it.
        assert_eq!(h.expect(Some(10), 512, 1), 10);
    }

    #[test]
    fn the_mean_is_per_choice_and_follows_recent_requests() {
        let h = DecodeHistory::default();
        for _ in 0..100 {
            h.record(300, 3);
        }
        assert_eq!(h.expect(None, 512, 1), 100);
        // Traffic changes: within a few windows the estimate is the new length.
        for _ in 0..4 * WINDOW {
            h.record(400, 1);
        }
        let now = h.expect(None, 512, 1);
        assert!((395..=400).contains(&now), "{now}");
        // A zero-choice report (malformed usage) counts as one choice, never a division by 0.
        h.record(7, 0);
        assert!(h.expect(None, 512, 0) > 0);
    }
}
