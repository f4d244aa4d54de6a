"""Unit tests of the worker's pure parts: chunk aggregation and host metrics."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from corral.keys import JobKind
from corral.worker.aggregate import Aggregator
from corral.worker.metrics import HostMetrics


def test_generate_chunks_fold_into_one_answer() -> None:
    agg = Aggregator(JobKind.GENERATE)
    for piece in ("echo: ", "hello ", "there"):
        agg.add({"model": "m", "response": piece, "done": False})
    agg.add({"model": "m", "response": "", "done": True, "eval_count": 3, "context": [1]})
    assert agg.result() == {
        "model": "m", "response": "echo: hello there", "done": True, "eval_count": 3, "context": [1]
    }  # fmt: skip


def test_chat_chunks_keep_thinking_and_tool_calls() -> None:
    agg = Aggregator(JobKind.CHAT)
    agg.add({"message": {"role": "assistant", "content": "", "thinking": "hmm "}, "done": False})
    agg.add({"message": {"role": "assistant", "content": "", "thinking": "ok"}, "done": False})
    call = {"function": {"name": "f", "arguments": {}}}
    agg.add({"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False})
    agg.add({"message": {"role": "assistant", "content": "done"}, "done": False})
    assert not agg.done
    agg.add({"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"})
    result = agg.result()
    assert result["message"] == {
        "role": "assistant", "content": "done", "thinking": "hmm ok", "tool_calls": [call]
    }  # fmt: skip
    assert result["done_reason"] == "stop"


def test_metrics_without_a_gpu_are_not_an_error() -> None:
    metrics = HostMetrics()
    try:
        reading = metrics.read()
    finally:
        metrics.close()
    assert 0 <= reading["cpu_percent"] <= 100 * 64
    assert reading["mem"]["total"] > 0
    assert isinstance(reading["gpus"], list)


def test_gpu_metrics_are_read_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NVML calls map to the heartbeat's fields (a stand-in NVML, as no GPU is here)."""
    nvml: Any = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=37)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=5, total=80)
    nvml.nvmlDeviceGetName = lambda handle: b"NVIDIA H100"
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    metrics = HostMetrics()
    assert metrics.read()["gpus"] == [
        {"index": 0, "name": "NVIDIA H100", "util_percent": 37, "mem_used": 5, "mem_total": 80}
    ]
    metrics.close()
