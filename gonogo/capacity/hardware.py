"""The hardware table (``hardware.toml``, data with its sources) and "this machine".

A ``GPUSpec`` is what the planner needs of one accelerator: dense peak FLOP/s per precision,
HBM size, and the two links a collective can run on (the NVLink domain and the scale-out
network, both per GPU and per direction). "This machine" is built from measurements a plan
made earlier (the doctor's memory, the collectives' bus bandwidth, the train stage's peak) so
the planner can predict a run that really happened here and be compared with it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic import Field

from gonogo.errors import UserError
from gonogo.typed_config import Strict, load_toml, validate

TABLE_PATH = Path(__file__).resolve().parent / "hardware.toml"
THIS_MACHINE = "this-machine"


class GPUSpec(Strict):
    name: str
    aliases: list[str] = Field(default_factory=list)
    peak_tflops: dict[str, float]            # dense, per GPU, by precision
    hbm_GB: float
    hbm_TBps: float = 0.0
    nvlink_domain: int                       # GPUs in one NVLink/NVSwitch domain
    nvlink_GBps: float                       # per GPU, per direction
    network_GBps: float                      # scale-out NIC per GPU, per direction
    nvlink_latency_us: float = 2.0
    network_latency_us: float = 5.0
    price_usd_per_gpu_hour: Optional[float] = None
    # measured links are already what a collective achieves; datasheet links are not
    measured_links: bool = False
    sources: list[str] = Field(default_factory=list)

    def peak_flops(self, precision: str) -> float:
        if precision not in self.peak_tflops:
            have = ", ".join(sorted(self.peak_tflops))
            raise UserError(f"{self.name} has no {precision} tensor-core peak (it has: {have}); "
                            f"choose --precision from those")
        return self.peak_tflops[precision] * 1e12


@lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict[str, GPUSpec]:
    data = load_toml(path).get("gpu", {})
    return {key: validate(GPUSpec, entry, f"{path.name} [gpu.{key}]") for key, entry in data.items()}


def gpu_names(path: Path = TABLE_PATH) -> list[str]:
    return sorted(load_table(path))


def get_gpu(name: str, path: Path = TABLE_PATH) -> GPUSpec:
    """A GPU of the table by key or alias (case-insensitive)."""
    wanted = name.strip().lower()
    for key, spec in load_table(path).items():
        if wanted == key or wanted in (alias.lower() for alias in spec.aliases):
            return spec
    known = ", ".join(gpu_names(path))
    raise UserError(f"unknown GPU kind {name!r}; known: {known}, or {THIS_MACHINE} inside a plan "
                    f"that measured this machine (doctor/collectives/train stages)")


def this_machine(*, peak_flops: float, memory_GB: float, busbw_GBps: float, devices: int,
                 precision: str = "bf16", name: str = "this machine") -> GPUSpec:
    """A one-node "GPU" kind from measurements: every device shares one domain whose links run
    at the measured bus bandwidth (what nccl-tests calls busbw is the per-rank link rate the
    alpha-beta model wants)."""
    assert peak_flops > 0 and memory_GB > 0 and busbw_GBps > 0 and devices >= 1
    return GPUSpec(
        name=name,
        peak_tflops={precision: peak_flops / 1e12},
        hbm_GB=memory_GB,
        nvlink_domain=devices,
        nvlink_GBps=busbw_GBps,
        network_GBps=busbw_GBps,
        # gloo over local TCP: tens of microseconds per hop
        nvlink_latency_us=50.0,
        network_latency_us=50.0,
        measured_links=True,
        sources=["measured in this run: doctor memory_GB, collectives busbw_GBps_avg, train peak"],
    )
