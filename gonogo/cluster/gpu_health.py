"""GPU health through NVML (the library behind nvidia-smi), via the ``pynvml`` module.

Every NVML query is guarded on its own: a feature the GPU or driver lacks reads "unsupported"
and any other NVML error reads "error: <reason>", so one missing counter never hides the rest.
Without the driver (a laptop, a CPU node) NVML cannot start and the probe says why instead of
failing. The NVML module is a parameter so tests can drive the same code with a fake.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

UNSUPPORTED = "unsupported"

# Clock throttle ("clocks event") reason bits, as defined in nvml.h; they are part of NVML's ABI.
THROTTLE_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

# Reasons that mean the GPU is running slower than it should because something is wrong (heat,
# a hardware protection, an external power brake). Idle, a power cap under load, sync boost and
# user-set clocks are normal operation.
UNHEALTHY_THROTTLE_REASONS = frozenset(
    {"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})


def decode_throttle_reasons(mask: int) -> list[str]:
    """The names of the bits set in an NVML clock throttle reason mask, lowest bit first."""
    names = []
    for bit in range(64):
        value = 1 << bit
        if mask & value:
            names.append(THROTTLE_REASONS.get(value, f"unknown_{value:#x}"))
    return names


def _text(value: Any) -> str:
    # pynvml returned bytes before 11.5 and str since
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Guard:
    """Calls NVML functions, turning an NVML error into a readable value instead of a crash."""

    def __init__(self, nvml: Any):
        self.nvml = nvml
        self._unsupported_codes = {
            getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
            getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13),
        }
        self.gpu_lost_code = getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15)
        self.lost = False

    def __call__(self, function_name: str, *args: Any) -> Any:
        function: Optional[Callable[..., Any]] = getattr(self.nvml, function_name, None)
        if function is None:  # an older pynvml without this call
            return UNSUPPORTED
        try:
            return function(*args)
        except self.nvml.NVMLError as error:
            code = getattr(error, "value", None)
            if code in self._unsupported_codes:
                return UNSUPPORTED
            if code == self.gpu_lost_code:
                self.lost = True
            log.debug("NVML %s%s failed: %s", function_name, args[1:], error)
            return f"error: {error}"


def _is_value(value: Any) -> bool:
    return not isinstance(value, str)


def _ecc_counts(guard: _Guard, handle: Any) -> dict[str, Any]:
    nvml = guard.nvml
    mode = guard("nvmlDeviceGetEccMode", handle)
    result: dict[str, Any] = {"enabled": bool(mode[0]) if isinstance(mode, (list, tuple)) else mode}
    for counter_name, counter in (("volatile", nvml.NVML_VOLATILE_ECC), ("aggregate", nvml.NVML_AGGREGATE_ECC)):
        result[counter_name] = {
            "corrected": guard("nvmlDeviceGetTotalEccErrors", handle,
                               nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, counter),
            "uncorrected": guard("nvmlDeviceGetTotalEccErrors", handle,
                                 nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, counter),
        }
    return result


def _nvlink_states(guard: _Guard, handle: Any) -> Any:
    """Per NVLink link "up" or "down"; "unsupported" for a GPU without NVLink.

    NVML answers "not supported" or "invalid argument" for link numbers a GPU does not have,
    so only the links that answer are listed.
    """
    nvml = guard.nvml
    if not hasattr(nvml, "nvmlDeviceGetNvLinkState"):
        return UNSUPPORTED
    invalid_argument = getattr(nvml, "NVML_ERROR_INVALID_ARGUMENT", 2)
    links = []
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            state = nvml.nvmlDeviceGetNvLinkState(handle, link)
        except nvml.NVMLError as error:
            if getattr(error, "value", None) in guard._unsupported_codes | {invalid_argument}:
                continue
            links.append({"link": link, "state": f"error: {error}"})
            continue
        if state == nvml.NVML_FEATURE_ENABLED:
            links.append({"link": link, "state": "up"})
        else:
            links.append({"link": link, "state": _inactive_link_state(nvml, handle, link)})
    return links or UNSUPPORTED


def _inactive_link_state(nvml: Any, handle: Any, link: int) -> str:
    """"down" for an inactive port wired to a peer, "disabled" for a port with no peer.

    A GPU has more NVLink ports than some systems wire (a PCIe card without bridges, a board that
    uses part of them): NVML lists those ports as inactive too, and they are not a fault. The
    peer's device type tells them apart; a driver that cannot answer leaves the port "down"
    (a readiness check does not call a link it cannot read healthy).
    """
    remote_type = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
    if remote_type is None:
        return "down"
    try:
        peer = remote_type(handle, link)
    except nvml.NVMLError:
        return "down"
    return "disabled" if peer == getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_UNKNOWN", 0xFF) else "down"


def _throttle(guard: _Guard, handle: Any) -> dict[str, Any]:
    # renamed "clocks event reasons" in newer drivers; the old name still works on older ones
    mask = guard("nvmlDeviceGetCurrentClocksEventReasons", handle)
    if not _is_value(mask):
        mask = guard("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
    if not _is_value(mask):
        return {"mask": mask, "reasons": mask}
    return {"mask": int(mask), "reasons": decode_throttle_reasons(int(mask))}


def _milliwatts_to_watts(value: Any) -> Any:
    return round(value / 1000.0, 1) if _is_value(value) else value


def _probe_device(guard: _Guard, index: int) -> dict[str, Any]:
    nvml = guard.nvml
    guard.lost = False
    handle = guard("nvmlDeviceGetHandleByIndex", index)
    if not _is_value(handle):
        return {"index": index, "error": handle, "lost": guard.lost}
    memory = guard("nvmlDeviceGetMemoryInfo", handle)
    capability = guard("nvmlDeviceGetCudaComputeCapability", handle)
    device = {
        "index": index,
        "name": _text(guard("nvmlDeviceGetName", handle)),
        "uuid": _text(guard("nvmlDeviceGetUUID", handle)),
        "memory_GB": round(memory.total / 1e9, 2) if _is_value(memory) else memory,
        "compute_capability": f"{capability[0]}.{capability[1]}" if _is_value(capability) else capability,
        "temperature_C": guard("nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU),
        "power_W": _milliwatts_to_watts(guard("nvmlDeviceGetPowerUsage", handle)),
        "power_limit_W": _milliwatts_to_watts(guard("nvmlDeviceGetEnforcedPowerLimit", handle)),
        "ecc": _ecc_counts(guard, handle),
        "throttle": _throttle(guard, handle),
        "nvlink": _nvlink_states(guard, handle),
    }
    device["lost"] = guard.lost
    return device


def probe_gpus(nvml: Any = None) -> dict[str, Any]:
    """Driver versions and per-GPU health; ``{"available": False, "reason": ...}`` without NVML."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as error:
            return {"available": False, "reason": f"NVML not available: pynvml is not installed ({error})",
                    "gpu_count": 0, "gpus": []}
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return {"available": False, "reason": f"NVML not available: {error}", "gpu_count": 0, "gpus": []}
    try:
        guard = _Guard(nvml)
        count = guard("nvmlDeviceGetCount")
        if not _is_value(count):
            return {"available": False, "reason": f"NVML not available: device count {count}",
                    "gpu_count": 0, "gpus": []}
        cuda_version = guard("nvmlSystemGetCudaDriverVersion")
        return {
            "available": True,
            "reason": None,
            "driver_version": _text(guard("nvmlSystemGetDriverVersion")),
            "nvml_version": _text(guard("nvmlSystemGetNVMLVersion")),
            # encoded as 1000 * major + 10 * minor
            "cuda_driver_version": (f"{cuda_version // 1000}.{(cuda_version % 1000) // 10}"
                                    if _is_value(cuda_version) else cuda_version),
            "gpu_count": int(count),
            "gpus": [_probe_device(guard, index) for index in range(int(count))],
        }
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as error:
            log.debug("nvmlShutdown failed: %s", error)


def uncorrected_ecc_errors(device: dict[str, Any]) -> int:
    """Uncorrected ECC errors since the driver loaded (volatile), else lifetime (aggregate).

    Volatile counts say whether the GPU is faulty now; the aggregate also holds errors that were
    since repaired by row remapping, which would fail a healthy GPU forever.
    """
    ecc = device.get("ecc") or {}
    for counter in ("volatile", "aggregate"):
        value = (ecc.get(counter) or {}).get("uncorrected")
        if _is_value(value) and value is not None:
            return int(value)
    return 0


def device_problems(device: dict[str, Any]) -> list[str]:
    """Why one GPU is unhealthy (empty list when it is healthy or could not be asked)."""
    label = f"GPU {device['index']}"
    if device.get("name"):
        label += f" ({device['name']})"
    problems = []
    if device.get("lost"):
        problems.append(f"{label}: NVML reports the GPU is lost (fell off the bus; needs a reset)")
    errors = uncorrected_ecc_errors(device)
    if errors > 0:
        problems.append(f"{label}: {errors} uncorrected ECC error(s)")
    reasons = (device.get("throttle") or {}).get("reasons")
    if isinstance(reasons, list):
        bad = [reason for reason in reasons if reason in UNHEALTHY_THROTTLE_REASONS]
        if bad:
            problems.append(f"{label}: clocks throttled by {', '.join(bad)}")
    links = device.get("nvlink")
    if isinstance(links, list):
        down = [str(link["link"]) for link in links if link["state"] not in ("up", "disabled")]
        if down:
            problems.append(f"{label}: NVLink link(s) {', '.join(down)} not up")
    return problems


def health_problems(report: dict[str, Any]) -> list[str]:
    """Every health problem of a ``probe_gpus`` report; no NVML is not a problem (a CPU machine)."""
    problems = []
    for device in report.get("gpus", []):
        problems.extend(device_problems(device))
    return problems


def summary_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The GPU health metrics a plan can gate on."""
    devices = report.get("gpus", [])
    temperatures = [device["temperature_C"] for device in devices
                    if _is_value(device.get("temperature_C")) and device.get("temperature_C") is not None]
    throttled = any(
        reason in UNHEALTHY_THROTTLE_REASONS
        for device in devices
        if isinstance((device.get("throttle") or {}).get("reasons"), list)
        for reason in device["throttle"]["reasons"])
    links_down = sum(
        1 for device in devices if isinstance(device.get("nvlink"), list)
        for link in device["nvlink"] if link["state"] not in ("up", "disabled"))
    return {
        "ecc_errors": sum(uncorrected_ecc_errors(device) for device in devices),
        "gpu_max_temperature_C": max(temperatures) if temperatures else None,
        "gpu_throttled": throttled,
        "nvlink_links_down": links_down,
    }
