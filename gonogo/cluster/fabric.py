"""Fabric health around a communication run: TCP retransmissions and InfiniBand error counters.

A collectives benchmark can show good bandwidth on a fabric that is quietly dropping packets
(TCP recovers by retransmitting, InfiniBand by link-level retries), so the benchmark also reports
how those counters moved while it ran:

- TCP: ``RetransSegs`` / ``OutSegs`` of the ``Tcp:`` lines of /proc/net/snmp, as the change over
  the run in percent. These are the kernel's counters for this machine's network namespace, so
  other traffic during the run counts too.
- InfiniBand: the error counters of /sys/class/infiniband/<device>/ports/<port>/counters/ (the
  ones the IB spec defines as errors; data and packet counters are left out). Where there is no
  InfiniBand the report says "none present".

Only the standard library is used; reading the counters takes microseconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SNMP_PATH = Path("/proc/net/snmp")
INFINIBAND_ROOT = Path("/sys/class/infiniband")

# Counters that only ever grow on a fault (the IBA PortCounters error attributes).
INFINIBAND_ERROR_COUNTERS = (
    "symbol_error",
    "link_error_recovery",
    "link_downed",
    "port_rcv_errors",
    "port_rcv_remote_physical_errors",
    "port_rcv_switch_relay_errors",
    "port_xmit_discards",
    "port_xmit_constraint_errors",
    "port_rcv_constraint_errors",
    "local_link_integrity_errors",
    "excessive_buffer_overrun_errors",
    "VL15_dropped",
)


@dataclass
class TcpCounters:
    out_segments: int
    retransmitted_segments: int


@dataclass
class FabricSnapshot:
    """The counters at one moment. ``tcp`` is None where /proc/net/snmp cannot be read."""

    tcp: Optional[TcpCounters]
    # "<device>/<port>/<counter>" -> value
    infiniband: dict[str, int] = field(default_factory=dict)


def read_tcp_counters(path: Path = SNMP_PATH) -> Optional[TcpCounters]:
    """OutSegs and RetransSegs from the two ``Tcp:`` lines (names, then values) of /proc/net/snmp."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    tcp_lines = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(tcp_lines) < 2:
        return None
    values = dict(zip(tcp_lines[0], tcp_lines[1]))
    try:
        return TcpCounters(out_segments=int(values["OutSegs"]),
                           retransmitted_segments=int(values["RetransSegs"]))
    except (KeyError, ValueError):
        log.warning("%s: no numeric OutSegs/RetransSegs in the Tcp lines", path)
        return None


def read_infiniband_counters(root: Path = INFINIBAND_ROOT) -> dict[str, int]:
    """Every error counter of every InfiniBand port, keyed "<device>/<port>/<counter>"."""
    counters: dict[str, int] = {}
    if not root.is_dir():
        return counters
    for counters_dir in sorted(root.glob("*/ports/*/counters")):
        device = counters_dir.parent.parent.parent.name
        port = counters_dir.parent.name
        for name in INFINIBAND_ERROR_COUNTERS:
            try:
                counters[f"{device}/{port}/{name}"] = int((counters_dir / name).read_text().strip())
            except (OSError, ValueError):
                continue  # a driver may not expose every counter
    return counters


def snapshot(snmp_path: Path = SNMP_PATH, infiniband_root: Path = INFINIBAND_ROOT) -> FabricSnapshot:
    return FabricSnapshot(tcp=read_tcp_counters(snmp_path),
                          infiniband=read_infiniband_counters(infiniband_root))


def retransmit_pct(before: Optional[TcpCounters], after: Optional[TcpCounters]) -> Optional[float]:
    """Retransmitted segments as a percentage of segments sent between two readings."""
    if before is None or after is None:
        return None
    sent = after.out_segments - before.out_segments
    retransmitted = after.retransmitted_segments - before.retransmitted_segments
    if sent <= 0:
        return 0.0
    return 100.0 * retransmitted / sent


def compare(before: FabricSnapshot, after: FabricSnapshot) -> dict[str, Any]:
    """What changed between two snapshots, as a JSON-ready dict."""
    tcp: Optional[dict[str, Any]] = None
    if before.tcp is not None and after.tcp is not None:
        tcp = {
            "out_segments": after.tcp.out_segments - before.tcp.out_segments,
            "retransmitted_segments": after.tcp.retransmitted_segments - before.tcp.retransmitted_segments,
            "retransmit_pct": retransmit_pct(before.tcp, after.tcp),
        }
    ports = sorted({key.rsplit("/", 1)[0] for key in after.infiniband})
    # a counter that went down was reset (or wrapped) during the run: count from zero
    increases = {key: value - before.infiniband.get(key, 0) if value >= before.infiniband.get(key, 0) else value
                 for key, value in after.infiniband.items()}
    errors = {key: delta for key, delta in increases.items() if delta > 0}
    return {
        "tcp": tcp,
        "infiniband": {
            "present": bool(ports),
            "ports": ports,
            "errors": errors,
            "error_total": sum(errors.values()),
        },
    }


def describe(report: dict[str, Any]) -> list[str]:
    """The fabric report as ``#`` comment lines for the end of an nccl-tests-style table."""
    lines = ["# Fabric health (this machine, over the run)"]
    tcp = report.get("tcp")
    if tcp is None:
        lines.append(f"# {'TCP retransmits':<20} : unknown (no readable {SNMP_PATH})")
    else:
        lines.append(f"# {'TCP retransmits':<20} : {tcp['retransmit_pct']:.3f} % "
                     f"({tcp['retransmitted_segments']} of {tcp['out_segments']} segments)")
    infiniband = report["infiniband"]
    if not infiniband["present"]:
        lines.append(f"# {'InfiniBand errors':<20} : none present")
    elif not infiniband["errors"]:
        lines.append(f"# {'InfiniBand errors':<20} : 0 OK ({len(infiniband['ports'])} ports)")
    else:
        detail = ", ".join(f"{key} +{delta}" for key, delta in sorted(infiniband["errors"].items()))
        lines.append(f"# {'InfiniBand errors':<20} : {infiniband['error_total']} FAILED ({detail})")
    return lines
