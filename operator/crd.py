"""Access to the TTSDeployment CRD file, the single source of truth for the resource's schema.

The API server applies the schema's defaults to every object it stores; code that reads a manifest
straight from a file (the simulator, tests) applies the same defaults from the same schema here,
so there is no second list of default values to drift.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any

import yaml

GROUP = "voxscale.io"
VERSION = "v1alpha1"
PLURAL = "ttsdeployments"
KIND = "TTSDeployment"
CRD_FILE = "voxscale.io_ttsdeployments.yaml"


@cache
def crd() -> dict[str, Any]:
    text = resources.files("voxscale.crds").joinpath(CRD_FILE).read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def schema() -> dict[str, Any]:
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == VERSION)
    s: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return s


def _default(node: Any, sch: dict[str, Any]) -> Any:
    if isinstance(node, dict) and sch.get("type") == "object":
        props: dict[str, Any] = sch.get("properties", {})
        for key, sub in props.items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if key in node:
                node[key] = _default(node[key], sub)
        return node
    if isinstance(node, list) and "items" in sch:
        return [_default(item, sch["items"]) for item in node]
    return node


def apply_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a TTSDeployment with the CRD's defaults filled in, as the API server would store it."""
    return _default(copy.deepcopy(obj), schema())  # type: ignore[no-any-return]


def default_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a `spec` with the CRD's defaults filled in (the engine's one table of defaults)."""
    spec_schema: dict[str, Any] = schema()["properties"]["spec"]
    out = copy.deepcopy(spec)
    # `type: slo` alone means the slo settings' defaults: give it the object they fill in.
    for trigger in (out.get("scaling") or {}).get("triggers") or []:
        if isinstance(trigger, dict) and trigger.get("type") == "slo" and trigger.get("slo") is None:
            trigger["slo"] = {}
    return _default(out, spec_schema)  # type: ignore[no-any-return]


def _unknown_fields(node: Any, sch: dict[str, Any], path: str, out: list[str]) -> None:
    if sch.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(node, dict) and "properties" in sch:
        for key, value in node.items():
            if key not in sch["properties"]:
                out.append(f'{path}.{key}: unknown field "{path.lstrip(".")}.{key}"')
            else:
                _unknown_fields(value, sch["properties"][key], f"{path}.{key}", out)
    elif isinstance(node, list) and "items" in sch:
        for i, item in enumerate(node):
            _unknown_fields(item, sch["items"], f"{path}[{i}]", out)


# A TTSDeployment's pods are <name>-<ReplicaSet hash, up to 10>-<5 random>; Kubernetes cuts a
# generated name's base at 58 characters, so a longer name would be truncated in its pods' names.
# The CRD's CEL rule says the same number to the API server.
MAX_NAME_LENGTH = 58 - len("-0123456789-")


def validate(obj: dict[str, Any]) -> list[str]:
    """Check a TTSDeployment read from a file against the CRD's own schema (no API server needed).

    Returns messages that start with the field path. The CEL rules are not evaluated here; the
    policy parser checks the same cross-field facts when it builds a ScalingPolicy.
    """
    import jsonschema

    errors: list[str] = []
    if obj.get("apiVersion") != f"{GROUP}/{VERSION}" or obj.get("kind") != KIND:
        errors.append(
            f"apiVersion/kind: expected {GROUP}/{VERSION} {KIND}, got {obj.get('apiVersion')} {obj.get('kind')}"
        )
    name = str((obj.get("metadata") or {}).get("name", ""))
    if len(name) > MAX_NAME_LENGTH:
        errors.append(
            f"metadata.name: {len(name)} characters; at most {MAX_NAME_LENGTH} (its pods are named "
            "<name>-<hash>-<5 characters>, and Kubernetes cuts longer pod names); choose a shorter name"
        )
    sch = schema()
    _unknown_fields(obj.get("spec"), sch["properties"]["spec"], ".spec", errors)
    validator = jsonschema.Draft4Validator({k: v for k, v in sch.items() if k != "x-kubernetes-validations"})
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        errors.append(f"{where or '.'}: {err.message}")
    return [e.lstrip(".") for e in errors]
