"""The settings contract ties the operator's Deployment, the server's Settings, the CLI and the CRD together."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

import pytest

from voxscale import settings_contract as sc
from voxscale.inference.settings import Settings
from voxscale.inference.stages import ENV as STAGE_WEIGHTS_ENV
from voxscale.operator import children, crd

SPEC: dict[str, Any] = {
    "model": {"image": "voxscale/inference:test", "maxBatchSize": 4, "maxQueueLength": 32, "precision": "bf16"},
    "service": {"port": 9000},
}
BY_ENV = {s.env: s for s in sc.SETTINGS}
# A value for each variable that differs from its default, as the operator or a user would set it.
OTHER_VALUES = {
    str: "other",
    int: "7",
    float: "7.5",
}


def _other(setting: sc.Setting[Any]) -> str:
    return setting.choices[-1] if setting.choices else OTHER_VALUES[setting.type]


def test_every_variable_the_operator_sets_is_in_the_contract_and_read_by_the_server() -> None:
    env = children.server_env(SPEC)
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), names
    for name in names:
        assert name in BY_ENV, f"{name}: set by server_env() but missing from voxscale/settings_contract.py"
        setting = BY_ENV[name]
        read = Settings.from_env({name: _other(setting)})
        assert getattr(read, setting.field) != getattr(Settings(), setting.field), f"{name} is not read"


def test_the_operators_values_come_from_the_spec_and_read_back_as_such() -> None:
    env = children.server_env(SPEC)
    literal = {e["name"]: e["value"] for e in env if "value" in e}
    settings = Settings.from_env(literal)
    assert (settings.max_batch, settings.max_queue, settings.precision, settings.port) == (4, 32, "bf16", 9000)
    assert settings.voice == sc.VOICE.default  # the CRD's default, filled in by the operator
    drain = children.drain_seconds(SPEC)
    assert settings.request_timeout_s == settings.drain_timeout_s == drain
    assert settings.voice_store == children.VOICE_STORE_PATH
    refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in env if "valueFrom" in e}
    assert refs == {sc.POD_NAME.env: "metadata.name", sc.POD_NAMESPACE.env: "metadata.namespace"}


def test_an_api_keys_secret_is_mounted_where_the_servers_setting_reads_it(tmp_path: Any) -> None:
    """spec.service.apiKeysSecret: the Secret's directory, read-only, named by VOXSCALE_API_KEYS; the
    server loads a directory shaped like a mounted Secret (Kubernetes' ..data links skipped)."""
    from voxscale.inference.tenants import load_keys

    ttsd = {"metadata": {"name": "tts", "namespace": "speech", "uid": "u"}, "spec": crd.default_spec(SPEC)}
    ttsd["spec"]["service"]["apiKeysSecret"] = "tts-keys"
    pod = children.deployment(ttsd)["spec"]["template"]["spec"]
    assert {"name": children.API_KEYS_VOLUME, "secret": {"secretName": "tts-keys"}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": children.API_KEYS_VOLUME, "mountPath": children.API_KEYS_PATH, "readOnly": True} in mounts
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert Settings.from_env({sc.API_KEYS.env: env[sc.API_KEYS.env]}).api_keys == children.API_KEYS_PATH
    # A Secret as the kubelet mounts it: the item is a link into a ..data folder.
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "keys.yaml").write_text("team-a: {key: a-key-of-sixteen-chars, requestsPerMinute: 60}\n")
    (tmp_path / "keys.yaml").symlink_to(tmp_path / "..data" / "keys.yaml")
    assert [k.id for k in load_keys(str(tmp_path), None)] == ["team-a"]
    plain = children.deployment({**ttsd, "spec": crd.default_spec(SPEC)})["spec"]["template"]["spec"]
    assert all(v["name"] != children.API_KEYS_VOLUME for v in plain["volumes"])
    assert sc.API_KEYS.env not in {e["name"] for e in plain["containers"][0]["env"]}


def test_a_users_own_variable_wins_over_the_operators() -> None:
    spec = {**SPEC, "model": {**SPEC["model"], "env": [{"name": sc.MAX_QUEUE.env, "value": "5"}]}}
    env = children.server_env(spec)
    assert [e["value"] for e in env if e["name"] == sc.MAX_QUEUE.env] == ["5"]


def test_settings_and_contract_name_the_same_fields_with_the_same_defaults() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert set(fields) == {s.field for s in sc.SETTINGS}
    assert len(sc.SETTINGS) == len(BY_ENV) == len(fields)
    for setting in sc.SETTINGS:
        assert fields[setting.field] == setting.default, setting.env
    assert Settings.from_env({}) == Settings()


def _schema_at(path: tuple[str, ...]) -> dict[str, Any]:
    node: dict[str, Any] = crd.schema()["properties"]["spec"]
    for key in path:
        node = node["properties"][key]
    return node


@pytest.mark.parametrize("setting", [s for s in sc.SETTINGS if s.spec_path], ids=lambda s: s.env)
def test_the_crd_agrees_with_the_contract_where_a_spec_field_feeds_a_variable(setting: sc.Setting[Any]) -> None:
    assert setting.spec_value(crd.default_spec({"model": {"image": "x"}})) == setting.default
    field_schema = _schema_at(setting.spec_path)
    assert tuple(field_schema.get("enum", setting.choices)) == setting.choices
    if "minimum" in field_schema:
        assert setting.minimum is not None and field_schema["minimum"] >= setting.minimum


def test_the_stage_weights_variable_is_the_one_stages_py_documents() -> None:
    assert sc.STAGE_WEIGHTS.env == STAGE_WEIGHTS_ENV


BAD_VALUES = [
    ("VOXSCALE_MAX_QUEUE", "many", "VOXSCALE_MAX_QUEUE='many': expected an integer"),
    ("VOXSCALE_MAX_WAIT_MS", "soon", "VOXSCALE_MAX_WAIT_MS='soon': expected a number"),
    ("VOXSCALE_PRECISION", "fp8", "VOXSCALE_PRECISION='fp8': use one of fp16, bf16, fp32"),
    ("VOXSCALE_MAX_BATCH_SIZE", "0", "VOXSCALE_MAX_BATCH_SIZE='0': must be at least 1"),
    ("VOXSCALE_JOB_TTL_S", "-5", "VOXSCALE_JOB_TTL_S='-5': must be at least 1"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_names_the_variable_and_what_it_takes(name: str, value: str, message: str) -> None:
    with pytest.raises(sc.SettingError, match=message):
        Settings.from_env({name: value})


def test_empty_means_the_default() -> None:
    assert Settings.from_env({s.env: "" for s in sc.SETTINGS}) == Settings()


def test_serve_refuses_a_bad_variable_before_loading_anything() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "serve"],
        env={**os.environ, "VOXSCALE_MAX_QUEUE": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "voxscale serve: VOXSCALE_MAX_QUEUE='0': must be at least 1" in out.stderr


def test_the_cli_help_shows_the_contracts_defaults() -> None:
    from voxscale.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for setting in (sc.PORT, sc.VOICE, sc.PRECISION):
        assert f"env {setting.env}; default {setting.default}" in " ".join(text.split())


def test_the_operator_reads_the_contract_without_the_servers_dependencies() -> None:
    code = (
        "import sys; import voxscale.settings_contract, voxscale.operator.children; "
        "print(sorted(m for m in ('torch', 'fastapi', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
