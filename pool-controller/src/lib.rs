//! The llmctl pool controller: owns each executor pool.
//!
//! `autoscaler` is the pure decision function (observations in, decision out). Still to come
//! (pool-controller and Kubernetes issues): pool specs, the reconciler that drives providers to
//! the decision, the providers (local child processes, Kubernetes pods), the `InferencePool`
//! CRD and the control API the gateways talk to.

pub mod autoscaler;
pub mod provider;
pub mod reconciler;
