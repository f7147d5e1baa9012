//! The llmctl gateway: the HTTP edge in front of the executor pools.
//!
//! It will own, in the order a request meets them: `auth` (bearer keys to tenants), `limit`
//! (per-tenant request and token rate limits), `queue` (a fair, bounded admission queue per pool),
//! `dispatch` (least-outstanding executor choice with prefix affinity and retries) and `proxy`
//! (streaming the worker's response through). It carries no GPU code. Built by the gateway issue.
