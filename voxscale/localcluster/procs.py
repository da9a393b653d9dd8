"""Small facts about this machine's processes and endpoints, shared by the local cluster and its
real node (which must not import cluster.py at module level: cluster.py imports it)."""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class HostProcess:
    """A long-running binary on this machine beside the local cluster (prometheus-operator,
    metrics-server, the image registry), its output in `log_path`. A mixin: the dataclass using it
    has the `log_path` and `proc` fields and builds the command line in its own `start`."""

    log_path: Path
    proc: subprocess.Popen[bytes] | None

    def launch(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Start `cmd` in a session of its own, so a test run's Ctrl-C reaches it only through stop()."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
