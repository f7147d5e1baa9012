//! Writes the `InferencePool` CRD to `manifests/base/crd.yaml` (or to stdout with `-`).
//! `cargo run -p llmctl-pool-controller --bin crdgen`

fn main() -> std::io::Result<()> {
    let yaml = llmctl_pool_controller::crd::crd_yaml();
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        Some(path) => std::fs::write(path, yaml)?,
        None => {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/crd.yaml");
            std::fs::write(&path, yaml)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
