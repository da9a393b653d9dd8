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
