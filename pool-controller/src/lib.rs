//! The llmctl pool controller: owns each executor pool.
//!
//! It will hold the pool specs, the autoscaler (a pure function from observations to a scaling
//! decision), the reconciler that drives providers to that decision, the providers themselves
//! (local child processes, Kubernetes pods), the `InferencePool` CRD and the control API the
//! gateways talk to. Built by the pool-controller and Kubernetes issues.
