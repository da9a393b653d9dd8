"""`voxscale proxy`: the door sidecar's flags, one per VOXSCALE_PROXY_* setting (settings.py names them)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

from voxscale.proxy.settings import PROXY_SETTINGS, ProxySettings
from voxscale.settings_contract import Setting, SettingError


def flag(setting: Setting[Any]) -> str:
    return "--" + setting.field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for setting in PROXY_SETTINGS:
        parser.add_argument(
            flag(setting),
            dest=setting.field,
            type=setting.type,
            help=f"{setting.help} (env {setting.env}; default {setting.default!r})",
        )


def run(args: argparse.Namespace) -> int:
    """Settings from the environment with the flags on top, then the door until SIGTERM and its drain."""
    if importlib.util.find_spec("aiohttp") is None:
        print("voxscale proxy needs aiohttp: pip install 'voxscale[proxy]'", file=sys.stderr)
        return 2
    from voxscale.proxy.app import SettingsProblem, check
    from voxscale.proxy.app import run as run_door

    try:
        settings = ProxySettings.from_env(os.environ, **{s.field: getattr(args, s.field) for s in PROXY_SETTINGS})
        check(settings)
    except (SettingError, SettingsProblem) as exc:
        print(f"voxscale proxy: {exc}", file=sys.stderr)
        return 2
    return run_door(settings)
