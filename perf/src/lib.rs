//! llmctl benchmarks: the engine benchmark (`engine_bench`), and later the load generator,
//! gateway/worker/kernel benchmarks and the autoscaler trace simulator. Results are recorded
//! under `perf/results/`.
