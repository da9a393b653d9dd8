"""A Kube for tests of the scaler's shell on plain data: it records what would be written (status
documents and the children applied) and does nothing else. Anything e2e talks to the real API server."""

from __future__ import annotations

from typing import Any


class RecordingKube:
    def __init__(self) -> None:
        self.writes: list[str] = []  # the name of each object whose status was written, in order
        self.statuses: list[dict[str, Any]] = []  # the documents written, in the same order
        self.applied: list[str] = []  # the objects whose children were applied

    def replace_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.writes.append(name)
        self.statuses.append(status)

    def event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        pass

    def scale(self, ns: str, name: str, replicas: int) -> None:
        pass

    def set_deletion_costs(self, ns: str, costs: dict[str, int]) -> None:
        pass

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        raise AssertionError("no Secret is read here")

    def apply_children(self, body: dict[str, Any]) -> list[str]:
        self.applied.append(body["metadata"]["name"])
        return ["Service"]
