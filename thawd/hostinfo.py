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
        from cuda.bindings import driver as cu

        from thaw.mem import cuda

        attr = cu.CUdevice_attribute
        out = []
        for i in range(cuda.device_count()):
            device = cuda.check(cu.cuDeviceGet(i), f"cuDeviceGet({i})")
            raw = cuda.check(cu.cuDeviceGetName(256, device), "cuDeviceGetName")
            name = raw.split(b"\0", 1)[0].decode()
            domain, bus_id, dev = (
                cuda.check(cu.cuDeviceGetAttribute(a, device), "cuDeviceGetAttribute")
                for a in (
                    attr.CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID,
                    attr.CU_DEVICE_ATTRIBUTE_PCI_BUS_ID,
                    attr.CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID,
                )
            )
            total = cuda.check(cu.cuDeviceTotalMem(device), "cuDeviceTotalMem")
            bus = f"{domain:04x}:{bus_id:02x}:{dev:02x}.0"
            out.append(pb.Gpu(index=i, name=name, memory_total=int(total), link=_link(bus)))
        return out
    except Exception as e:  # no driver, no device, old bindings: a host without GPUs
        log.info("no GPUs: %s", e)
        return []
