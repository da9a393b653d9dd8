"""The server's metric helpers without a model: the gpu_product label and busy-time accounting."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter

from voxscale.inference.server_metrics import BusyClock, gpu_product


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA-A100-SXM4-40GB"),
        ("Tesla T4 ", "Tesla-T4"),
    ],
)
def test_gpu_product_has_the_form_of_the_node_label(name: str, label: str) -> None:
    assert gpu_product(torch.device("cuda:0"), device_name=lambda _: name) == label


def test_gpu_product_is_cpu_without_a_gpu() -> None:
    assert gpu_product(torch.device("cpu"), device_name=lambda _: pytest.fail("no CUDA name on the CPU")) == "cpu"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_counts_overlapping_batches_once() -> None:
    registry = CollectorRegistry()
    busy = BusyClock(Counter("busy_seconds", "test", registry=registry), clock := FakeClock())

    def seconds() -> float | None:
        return registry.get_sample_value("busy_seconds_total")

    with busy.running():  # 0..5
        clock.now = 1.0
        with busy.running():  # 1..3, inside the first
            clock.now = 3.0
        assert seconds() == 3.0  # moves at every boundary, not only when the last batch ends
        clock.now = 5.0
    clock.now = 10.0  # idle time is not busy time
    with busy.running():  # 10..12
        clock.now = 12.0
    assert seconds() == 7.0
