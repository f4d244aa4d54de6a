"""Host metrics for the heartbeat: CPU and memory (psutil), NVIDIA GPUs (NVML) if any.

A host without an NVIDIA GPU or driver is normal: NVML failing to start simply means
no ``gpus`` in the heartbeat.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import psutil

log = logging.getLogger(__name__)


class HostMetrics:
    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            log.info("NVML started: %d GPU(s)", pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # NVML raises its own error types, or ImportError
            log.info("no NVIDIA GPU metrics on this host (%s)", exc)
        psutil.cpu_percent(interval=None)  # primes the counter so the first reading is real

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML shutdown failed: %s", exc)
            self._nvml = None

    def read(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem": {"total": mem.total, "used": mem.total - mem.available, "percent": mem.percent},
            "gpus": self._gpus(),
        }

    def _gpus(self) -> list[dict[str, Any]]:
        nvml = self._nvml
        if nvml is None:
            return []
        gpus: list[dict[str, Any]] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                gpus.append(
                    {
                        "index": index,
                        "name": name.decode() if isinstance(name, bytes) else str(name),
                        "util_percent": int(util.gpu),
                        "mem_used": int(mem.used),
                        "mem_total": int(mem.total),
                    }
                )
        except Exception as exc:  # a GPU falling off the bus must not stop heartbeats
            log.warning("reading GPU metrics failed: %s", exc)
        return gpus


def host_addresses() -> list[str]:
    """Non-loopback IPv4/IPv6 addresses of this host, for operators reading the registry."""
    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6) and not addr.address.startswith(
                ("127.", "::1", "fe80")
            ):
                found.append(addr.address.split("%")[0])
    return found or ["127.0.0.1"]
