//! Which endpoint gets the next request: least outstanding requests, with optional prefix
//! affinity (rendezvous hashing of a prompt-prefix key, honoured while the preferred endpoint
//! is at most [`AFFINITY_SLACK`] requests busier than the least busy one). Pure, so the
//! gateway's dispatcher and the controller's trace replay make the same choice; which
//! endpoints may take a request at all (free slots, ejection, draining) is the caller's
//! business.

use std::hash::{Hash, Hasher};

/// How far (in outstanding requests) an affinity choice may exceed the least busy endpoint.
pub const AFFINITY_SLACK: usize = 4;

/// An endpoint that can take one more request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The caller's index for it, returned by [`pick`].
    pub index: usize,
    /// Its stable identity for affinity (`host:port`).
    pub address: &'a str,
    pub outstanding: usize,
}

fn rendezvous(key: u64, address: &str) -> u64 {
    // SipHash with fixed keys: the same choice in every process and every run.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    address.hash(&mut h);
    h.finish()
}

/// The chosen candidate's `index`, or `None` when there is no candidate. Ties in load go to
/// the earliest candidate.
pub fn pick(candidates: &[Candidate<'_>], affinity: Option<u64>) -> Option<usize> {
    let least = candidates
        .iter()
        .enumerate()
        .min_by_key(|(i, c)| (c.outstanding, *i))
        .map(|(_, c)| c)?;
    if let Some(key) = affinity {
        let preferred = candidates
            .iter()
            .max_by_key(|c| rendezvous(key, c.address))?;
        if preferred.outstanding <= least.outstanding + AFFINITY_SLACK {
            return Some(preferred.index);
        }
    }
    Some(least.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands<'a>(addresses: &'a [String], outstanding: &[usize]) -> Vec<Candidate<'a>> {
        addresses
            .iter()
            .zip(outstanding)
            .enumerate()
            .map(|(index, (address, &outstanding))| Candidate {
                index: index * 10,
                address,
                outstanding,
            })
            .collect()
    }

    #[test]
    fn least_outstanding_then_affinity_within_the_slack() {
        let addresses: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:80")).collect();
        assert_eq!(pick(&cands(&addresses, &[3, 1, 2, 1]), None), Some(10));
        assert_eq!(pick(&[], Some(7)), None);
        let key = 0xfeed;
        let first = pick(&cands(&addresses, &[0; 4]), Some(key)).unwrap();
        assert_eq!(pick(&cands(&addresses, &[0; 4]), Some(key)), Some(first));
        let mut busy = [0; 4];
        busy[first / 10] = AFFINITY_SLACK;
        assert_eq!(pick(&cands(&addresses, &busy), Some(key)), Some(first));
        busy[first / 10] = AFFINITY_SLACK + 1;
        assert_ne!(pick(&cands(&addresses, &busy), Some(key)), Some(first));
        let spread: std::collections::HashSet<_> = (0..64)
            .map(|k| pick(&cands(&addresses, &[0; 4]), Some(k)).unwrap())
            .collect();
        assert!(spread.len() >= 3, "prefixes spread over endpoints");
    }
}
