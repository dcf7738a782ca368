"""What the host has: memory (psutil) and GPUs (the CUDA driver, PCIe link from sysfs)."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil

from thaw._proto import thawd_pb2 as pb
from thaw.errors import CudaError

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
        from thaw.mem import cuda, driver

        out = []
        for i in range(cuda.device_count()):
            domain, bus_id, dev = (
                cuda.device_attribute(i, a)
                for a in (
                    driver.DEVICE_ATTRIBUTE_PCI_DOMAIN_ID,
                    driver.DEVICE_ATTRIBUTE_PCI_BUS_ID,
                    driver.DEVICE_ATTRIBUTE_PCI_DEVICE_ID,
                )
            )
            bus = f"{domain:04x}:{bus_id:02x}:{dev:02x}.0"
            gpu = pb.Gpu(index=i, name=cuda.device_name(i), memory_total=cuda.device_memory(i),
                         link=_link(bus))  # fmt: skip
            out.append(gpu)
        return out
    except CudaError as e:  # a driver that fails: a host without GPUs
        log.info("no GPUs: %s", e)
        return []
