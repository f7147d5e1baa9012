//! Bearer keys to tenants. Keys are compared by their SHA-256 digest (the config stores only
//! digests). The tenant table is swapped whole on reload; a request keeps the tenant (and its
//! rate-limit state) it started with.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use http::HeaderMap;

use crate::config::{Config, hash_key};
use crate::limit::TenantLimits;

/// A tenant as requests see it: its name, class and live rate-limit state.
pub struct TenantState {
    pub name: Arc<str>,
    pub priority: crate::config::Priority,
    pub limits: TenantLimits,
    /// Models or pool names its keys may use (`None`: every one).
    pub models: Option<Vec<String>>,
}

impl TenantState {
    /// Whether the tenant may use `model`, served by `pool`. Others answer as unknown models.
    pub fn may_use(&self, model: &str, pool: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model || x == pool))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing API key")]
    Missing,
    #[error("invalid API key")]
    Invalid,
}

struct Table {
    open: Option<Arc<TenantState>>,
    by_key: HashMap<[u8; 32], Arc<TenantState>>,
    by_name: HashMap<String, Arc<TenantState>>,
}

pub struct Tenants {
    table: RwLock<Arc<Table>>,
}

impl Tenants {
    pub fn new(config: &Config) -> Self {
        Self {
            table: RwLock::new(Arc::new(build(config, None))),
        }
    }

    /// Replaces the table from a new config, keeping the live limit state of tenants whose
    /// limits did not change.
    pub fn reload(&self, config: &Config) {
        let old = self.current();
        let table = build(config, Some(&old));
        *self
            .table
            .write()
            .expect("tenant table lock is never poisoned") = Arc::new(table);
    }

    fn current(&self) -> Arc<Table> {
        self.table
            .read()
            .expect("tenant table lock is never poisoned")
            .clone()
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<TenantState>, AuthError> {
        let table = self.current();
        if let Some(open) = &table.open {
            return Ok(open.clone());
        }
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::Invalid)?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        table
            .by_key
            .get(&hash_key(key))
            .cloned()
            .ok_or(AuthError::Invalid)
    }

    pub fn names(&self) -> Vec<String> {
        self.current().by_name.keys().cloned().collect()
    }
}

fn build(config: &Config, old: Option<&Table>) -> Table {
    let mut by_key = HashMap::new();
    let mut by_name = HashMap::new();
    for t in &config.tenants {
        let reuse = old.and_then(|o| o.by_name.get(&t.name)).filter(|s| {
            s.priority == t.priority
                && s.models == t.models
                && s.limits.matches(t.requests_per_minute, t.tokens_per_minute)
        });
        let state = reuse.cloned().unwrap_or_else(|| {
            Arc::new(TenantState {
                name: Arc::from(t.name.as_str()),
                priority: t.priority,
                limits: TenantLimits::new(t.requests_per_minute, t.tokens_per_minute),
                models: t.models.clone(),
            })
        });
        for k in &t.key_hashes {
            by_key.insert(*k, state.clone());
        }
        by_name.insert(t.name.clone(), state);
    }
    let open = config.open.then(|| {
        old.and_then(|o| o.open.clone()).unwrap_or_else(|| {
            Arc::new(TenantState {
                name: Arc::from("open"),
                priority: crate::config::Priority::Normal,
                limits: TenantLimits::new(None, None),
                models: None,
            })
        })
    });
    Table {
        open,
        by_key,
        by_name,
    }
}
