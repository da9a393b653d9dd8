"""Static checks of the CRD file, the single source of truth for the TTSDeployment schema."""

from __future__ import annotations

from typing import Any

from voxscale.operator import crd
from voxscale.operator.policy import ScalingPolicy


def _fields(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, sub in node.get("properties", {}).items():
        out.append((f"{path}.{name}", sub))
        out += _fields(sub, f"{path}.{name}")
    if "items" in node:
        out += _fields(node["items"], f"{path}[]")
    return out


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = [p for p, sub in _fields(crd.schema()) if not sub.get("description") and p != ".metadata"]
    assert missing == []


def test_defaults_come_from_the_crd_and_parse_into_a_policy() -> None:
    obj = crd.apply_defaults({"spec": {"model": {"image": "x:1"}}})
    spec = obj["spec"]
    assert spec["replicas"] == {"min": 1, "max": 10, "allowScaleToZero": False}
    assert spec["scaling"]["interval"] == "10s"
    assert spec["scaling"]["fallback"]["mode"] == "hold"
    policy = ScalingPolicy.from_spec(spec)
    assert (policy.min_replicas, policy.max_replicas, policy.interval.total_seconds()) == (1, 10, 10)
    assert policy.scale_down.stabilization_window.total_seconds() == 300


def test_a_name_longer_than_its_pods_keep_is_refused_by_the_file_check_and_the_cel_rule() -> None:
    obj = {"apiVersion": "voxscale.io/v1alpha1", "kind": "TTSDeployment", "spec": {"model": {"image": "x:1"}}}
    long_name = {**obj, "metadata": {"name": "n" * (crd.MAX_NAME_LENGTH + 1)}}
    assert any(e.startswith("metadata.name: ") for e in crd.validate(long_name))
    assert crd.validate({**obj, "metadata": {"name": "n" * crd.MAX_NAME_LENGTH}}) == []
    # The API server's rule says the same number (one limit, stated twice only in different languages).
    rules = [r["rule"] for r in crd.schema()["x-kubernetes-validations"]]
    assert f"self.metadata.name.size() <= {crd.MAX_NAME_LENGTH}" in rules


def test_printer_columns_and_short_name() -> None:
    doc = crd.crd()
    assert doc["spec"]["names"]["shortNames"] == ["ttsd"]
    version = doc["spec"]["versions"][0]
    cols = [c["name"] for c in version["additionalPrinterColumns"]]
    assert cols == ["Min", "Max", "Desired", "Ready", "Demand", "Forecast", "Advised", "Reason", "Age"]
    wide = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")]
    assert wide == ["Demand", "Forecast", "Advised"]  # shown by `kubectl get ttsd -o wide`
    assert version["subresources"] == {"status": {}}


def test_model_and_target_ref_are_exclusive_alternatives_described_for_kubectl_explain() -> None:
    spec = crd.schema()["properties"]["spec"]
    assert "model" not in spec.get("required", [])  # either one: the CEL rule says exactly one
    rules = {r["rule"]: r["message"] for r in spec["x-kubernetes-validations"]}
    message = rules["has(self.model) != has(self.targetRef)"]
    assert "spec.model" in message and "spec.targetRef" in message and "remove one" in message
    ref = spec["properties"]["targetRef"]
    assert ref["required"] == ["apiVersion", "kind", "name"]
    assert "scale subresource" in ref["description"] and "exactly one" in ref["description"]
    assert "targetRef" in spec["description"]
    # No defaults under targetRef: nothing there the API server would fill in.
    assert not any("default" in sub for sub in ref["properties"].values())
    # A spec with a targetRef and no model gets no model from the defaults (it would fail the rule).
    assert "model" not in crd.default_spec({"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"}})
