"""GPU health through NVML (the library behind nvidia-smi), via the ``pynvml`` module.

Every NVML query is guarded on its own: a feature the GPU or driver lacks reads "unsupported"
and any other NVML error reads "error: <reason>", so one missing counter never hides the rest.
Without the driver (a laptop, a CPU node) NVML cannot start and the probe says why instead of
failing. The NVML module is a parameter so tests can drive the same code with a fake.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
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


NVIDIA_PCI_VENDOR = "0x10de"
PCI_DEVICES = Path("/sys/bus/pci/devices")


def nvidia_pci_devices(root: Path = PCI_DEVICES) -> Optional[int]:
    """How many NVIDIA display/3D controllers the PCI bus lists (readable without the driver);
    None when this cannot be told (no sysfs)."""
    if sys.platform == "darwin":  # macOS has had no NVIDIA driver since 10.14
        return 0
    try:
        count = 0
        for device in root.iterdir():
            vendor = (device / "vendor").read_text().strip().lower()
            device_class = (device / "class").read_text().strip().lower()
            # class 0x03xxxx: display controller (0x0300 VGA, 0x0302 3D controller as on data-centre GPUs)
            if vendor == NVIDIA_PCI_VENDOR and device_class.startswith("0x03"):
                count += 1
        return count
    except OSError as error:
        log.debug("cannot list PCI devices under %s: %s", root, error)
        return None


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "gpu_count": 0, "gpus": [],
            "pci_nvidia_gpus": nvidia_pci_devices()}


def probe_gpus(nvml: Any = None) -> dict[str, Any]:
    """Driver versions and per-GPU health; ``{"available": False, "reason": ...}`` without NVML
    (with ``pci_nvidia_gpus``: whether there are GPUs NVML should have answered for)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError as error:
            return _unavailable(f"NVML not available: pynvml is not installed ({error})")
    try:
        nvml.nvmlInit()
    except Exception as error:  # NVMLError, or a broken binding raising anything else
        return _unavailable(f"NVML not available: {error}")
    try:
        guard = _Guard(nvml)
        count = guard("nvmlDeviceGetCount")
        if not _is_value(count):
            return _unavailable(f"NVML not available: device count {count}")
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


def uncorrected_ecc_errors(device: dict[str, Any]) -> Optional[int]:
    """Uncorrected ECC errors since the driver loaded (volatile), else lifetime (aggregate);
    None when neither counter could be read (ECC unsupported, or an NVML error).

    Volatile counts say whether the GPU is faulty now; the aggregate also holds errors that were
    since repaired by row remapping, which would fail a healthy GPU forever.
    """
    ecc = device.get("ecc") or {}
    for counter in ("volatile", "aggregate"):
        value = (ecc.get(counter) or {}).get("uncorrected")
        if _is_value(value) and value is not None:
            return int(value)
    return None


def _label(device: dict[str, Any]) -> str:
    label = f"GPU {device['index']}"
    if device.get("name") and not str(device["name"]).startswith(("error", UNSUPPORTED)):
        label += f" ({device['name']})"
    return label


def device_problems(device: dict[str, Any]) -> list[str]:
    """Why one GPU is unhealthy (empty list when no check that could be read failed)."""
    label = _label(device)
    problems = []
    if device.get("lost"):
        problems.append(f"{label}: NVML reports the GPU is lost (fell off the bus; needs a reset)")
    errors = uncorrected_ecc_errors(device)
    if errors:
        problems.append(f"{label}: {errors} uncorrected ECC error(s)")
    reasons = (device.get("throttle") or {}).get("reasons")
    if isinstance(reasons, list):
        bad = [reason for reason in reasons if reason in UNHEALTHY_THROTTLE_REASONS]
        if bad:
            problems.append(f"{label}: clocks throttled by {', '.join(bad)}")
    links = device.get("nvlink")
    if isinstance(links, list):
        down = [str(link["link"]) for link in links if link["state"] == "down"]
        if down:
            problems.append(f"{label}: NVLink link(s) {', '.join(down)} not up")
    return problems


def device_unknowns(device: dict[str, Any]) -> dict[str, str]:
    """Per health check of one GPU that could not be read, why (NVML "unsupported" or an error).

    Keys: "device", "ecc", "throttle", "temperature", "nvlink". An unreadable check is never
    counted as a passed one.
    """
    label = _label(device)
    if "error" in device:
        return {"device": f"{label}: cannot open the device through NVML ({device['error']})"}
    unknown = {}
    if uncorrected_ecc_errors(device) is None:
        value = ((device.get("ecc") or {}).get("volatile") or {}).get("uncorrected")
        unknown["ecc"] = f"{label}: ECC error counters not readable ({value})"
    reasons = (device.get("throttle") or {}).get("reasons")
    if not isinstance(reasons, list):
        unknown["throttle"] = f"{label}: clock throttle reasons not readable ({reasons})"
    temperature = device.get("temperature_C")
    if not _is_value(temperature) or temperature is None:
        unknown["temperature"] = f"{label}: temperature not readable ({temperature})"
    links = device.get("nvlink")
    if not isinstance(links, list):
        unknown["nvlink"] = f"{label}: NVLink state not readable ({links}; a GPU without NVLink reads so)"
    else:
        broken = [f"{link['link']} ({link['state']})" for link in links if link["state"] not in ("up", "down", "disabled")]
        if broken:
            unknown["nvlink"] = f"{label}: NVLink link(s) {', '.join(broken)} not readable"
    return unknown


def health_problems(report: dict[str, Any]) -> list[str]:
    """Every health problem of a ``probe_gpus`` report that was measured."""
    problems = []
    for device in report.get("gpus", []):
        problems.extend(device_problems(device))
    return problems


def no_gpu_reason(report: dict[str, Any]) -> Optional[str]:
    """Why there is no GPU to check when NVML is unavailable on a machine without NVIDIA GPUs
    (the PCI bus lists none); None when there are GPUs, or when that cannot be told."""
    if report.get("available") or report.get("pci_nvidia_gpus") != 0:
        return None
    return f"no NVIDIA GPU on this machine (the PCI bus lists none; {report.get('reason')})"


def health_unknowns(report: dict[str, Any]) -> list[str]:
    """The GPU health checks that could not be made, each with why. Empty on a machine that has
    no NVIDIA GPU (nothing to check). NVLink that is unsupported (PCIe GPUs) is not listed here:
    it leaves ``nvlink_links_down`` unknown but says nothing about the GPU's health."""
    if not report.get("available"):
        if no_gpu_reason(report):
            return []
        pci = report.get("pci_nvidia_gpus")
        seen = (f"the PCI bus lists {pci} NVIDIA GPU(s)" if pci
                else "the PCI bus could not be read to tell whether there are GPUs")
        return [f"GPU health unknown: {report.get('reason')}, while {seen}"]
    unknowns: list[str] = []
    for device in report.get("gpus", []):
        unknowns.extend(reason for key, reason in device_unknowns(device).items() if key != "nvlink")
    return unknowns


def summary_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The GPU health metrics a plan can gate on. A metric that could not be read on every GPU is
    None, and ``unknown`` (present only then) says why: a GPU whose ECC counters NVML could not
    read has unknown ECC errors, never 0."""
    names = ("ecc_errors", "gpu_max_temperature_C", "gpu_throttled", "nvlink_links_down")
    if not report.get("available"):
        why = no_gpu_reason(report) or (health_unknowns(report) or [str(report.get("reason"))])[0]
        return {**dict.fromkeys(names), "unknown": dict.fromkeys(names, why)}
    devices = report.get("gpus", [])
    if not devices:
        why = "NVML lists no GPU"
        return {**dict.fromkeys(names), "unknown": dict.fromkeys(names, why)}
    per_device = [device_unknowns(device) for device in devices]

    def first(check: str) -> Optional[str]:
        reasons = [unknown.get(check) or unknown.get("device") for unknown in per_device]
        return next((reason for reason in reasons if reason), None)

    unknown: dict[str, Optional[str]] = {}
    metrics: dict[str, Any] = {}
    if first("ecc"):
        unknown["ecc_errors"] = first("ecc")
        metrics["ecc_errors"] = None
    else:
        metrics["ecc_errors"] = sum(uncorrected_ecc_errors(device) or 0 for device in devices)
    if first("temperature"):
        unknown["gpu_max_temperature_C"] = first("temperature")
        metrics["gpu_max_temperature_C"] = None
    else:
        metrics["gpu_max_temperature_C"] = max(device["temperature_C"] for device in devices)
    throttled = any(
        reason in UNHEALTHY_THROTTLE_REASONS
        for device in devices
        if isinstance((device.get("throttle") or {}).get("reasons"), list)
        for reason in device["throttle"]["reasons"])
    if not throttled and first("throttle"):
        unknown["gpu_throttled"] = first("throttle")
        metrics["gpu_throttled"] = None
    else:
        metrics["gpu_throttled"] = throttled  # one throttled GPU is known, whatever the others say
    if first("nvlink"):
        unknown["nvlink_links_down"] = first("nvlink")
        metrics["nvlink_links_down"] = None
    else:
        metrics["nvlink_links_down"] = sum(
            1 for device in devices for link in device["nvlink"] if link["state"] == "down")
    if unknown:
        metrics["unknown"] = unknown
    return metrics
