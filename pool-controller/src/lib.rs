//! The llmctl pool controller: owns each executor pool.
//!
//! `autoscaler` is the pure decision function (observations in, decision out); `demand` sums
//! the gateways' demand reports; `reconciler` drives a `provider` (local child processes now,
//! Kubernetes pods later) to the autoscaler's decisions. Still to come (pool-controller and
//! Kubernetes issues): pool spec files, the control API the gateways talk to, metrics, the
//! `InferencePool` CRD.

pub mod autoscaler;
pub mod demand;
pub mod provider;
pub mod reconciler;
