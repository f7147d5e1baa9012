//! The committed CRD (`manifests/base/crd.yaml`) is what `crdgen` writes from the Rust types, and
//! it parses as a Kubernetes `CustomResourceDefinition` with the status subresource and the
//! printer columns SREs see in `kubectl get ipool`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

#[test]
fn committed_crd_is_in_sync_with_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/crd.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == llmctl_pool_controller::crd::crd_yaml(),
        "{} is out of date: run `cargo run -p llmctl-pool-controller --bin crdgen` and commit it",
        path.display()
    );
    let crd: CustomResourceDefinition = serde_yaml::from_str(&committed).unwrap();
    assert_eq!(crd.spec.group, "llmctl.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let columns: Vec<&str> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    for want in ["Model", "Warm", "Ephemeral", "Ready", "Desired"] {
        assert!(columns.contains(&want), "{columns:?}");
    }
}
