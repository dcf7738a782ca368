"""What the host has: memory (psutil) and GPUs (cuda.bindings, PCIe link from sysfs)."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil

from thaw._proto import thawd_pb2 as pb

log = logging.getLogger("thawd.hostinfo")


def host_memory() -> tuple[int, int]:
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _link(bus_id: str) -> str:
    dev = Path("/sys/bus/pci/devices") / bus_id.lower()
    try:
        speed = (dev / "current_link_speed").read_text().strip()
        width = (dev / "current_link_width").read_text().strip()
    except OSError:
        return ""
    gen = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}.get(speed.split()[0], 0)
    return f"PCIe Gen{gen} x{width}" if gen else f"{speed} x{width}"


def gpus() -> list[pb.Gpu]:
    """The GPUs CUDA sees; [] without a driver. Called once at start (CUDA init is slow)."""
    try:
        from cuda.bindings import runtime as rt

        err, count = rt.cudaGetDeviceCount()
        if err != rt.cudaError_t.cudaSuccess:
            return []
        out = []
        for i in range(count):
            err, prop = rt.cudaGetDeviceProperties(i)
            if err != rt.cudaError_t.cudaSuccess:
                continue
            name = (
                prop.name.split(b"\0", 1)[0].decode()
                if isinstance(prop.name, bytes)
                else str(prop.name)
            )
            bus = f"{prop.pciDomainID:04x}:{prop.pciBusID:02x}:{prop.pciDeviceID:02x}.0"
            out.append(
                pb.Gpu(index=i, name=name, memory_total=int(prop.totalGlobalMem), link=_link(bus))
            )
        return out
    except Exception as e:  # no driver, no device, old bindings: a host without GPUs
        log.info("no GPUs: %s", e)
        return []
