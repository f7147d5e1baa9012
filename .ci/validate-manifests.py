"""Validates every manifest under manifests/ (CI; see docs/kubernetes.md).

Kubernetes objects are checked strictly (unknown fields are errors) against the Kubernetes
1.33 schemas with kubernetes-validate; InferencePool objects against the openAPIV3Schema of our
own CRD (manifests/base/crd.yaml), also strictly. Prometheus Operator objects have no schema
here; their structure is checked by the Rust test tests/manifests.rs.
"""

import copy
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.33.0"
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def strict(schema):
    """Rejects unknown properties wherever the schema lists properties and allows no others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def main():
    root = pathlib.Path(__file__).resolve().parent.parent / "manifests"
    crd = yaml.safe_load((root / "base" / "crd.yaml").read_text())
    pool_schema = strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    # metadata is the API server's business, not the CRD's.
    pool_schema["properties"]["metadata"] = {"type": "object"}
    pool_schema["properties"]["apiVersion"] = {"const": "llmctl.io/v1alpha1"}
    pool_schema["properties"]["kind"] = {"const": "InferencePool"}
    failures = 0
    checked = 0
    for path in sorted(root.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            kind = doc.get("kind")
            name = f"{path.relative_to(root)}: {kind}/{doc.get('metadata', {}).get('name')}"
            try:
                if kind == "InferencePool":
                    jsonschema.validate(doc, pool_schema)
                elif kind in OPERATOR_KINDS:
                    continue
                else:
                    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                checked += 1
                print(f"ok   {name}")
            except Exception as e:  # noqa: BLE001 - every failure is reported the same way
                failures += 1
                message = getattr(e, "message", str(e))
                print(f"FAIL {name}: {message}")
    print(f"{checked} objects valid, {failures} invalid")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
