"""Fabric health counters: TCP retransmissions from /proc/net/snmp, InfiniBand port error counters."""

import sys
from pathlib import Path

import pytest

from gonogo.cluster import fabric

SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 2 64 3839
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 20 7 0 0 0 3803 {out} {retrans} 0 12 0
Udp: InDatagrams NoPorts
Udp: 5 0
"""


def write_snmp(path: Path, out: int, retrans: int) -> Path:
    path.write_text(SNMP.format(out=out, retrans=retrans))
    return path


def write_port(root: Path, device: str, port: int, **counters: int) -> None:
    directory = root / device / "ports" / str(port) / "counters"
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in counters.items():
        (directory / name).write_text(f"{value}\n")


def test_tcp_retransmit_rate_is_the_delta_over_the_run(tmp_path):
    before = fabric.read_tcp_counters(write_snmp(tmp_path / "a", out=1000, retrans=10))
    after = fabric.read_tcp_counters(write_snmp(tmp_path / "b", out=5000, retrans=30))
    assert before == fabric.TcpCounters(out_segments=1000, retransmitted_segments=10)
    assert fabric.retransmit_pct(before, after) == pytest.approx(0.5)  # 20 of 4000 segments
    report = fabric.compare(fabric.FabricSnapshot(tcp=before), fabric.FabricSnapshot(tcp=after))
    assert report["tcp"] == {"out_segments": 4000, "retransmitted_segments": 20, "retransmit_pct": pytest.approx(0.5)}
    assert "0.500 % (20 of 4000 segments)" in "\n".join(fabric.describe(report))


def test_no_traffic_is_zero_and_unreadable_counters_are_unknown(tmp_path):
    same = fabric.read_tcp_counters(write_snmp(tmp_path / "a", out=7, retrans=1))
    assert fabric.retransmit_pct(same, same) == 0.0
    assert fabric.read_tcp_counters(tmp_path / "missing") is None
    (tmp_path / "garbled").write_text("Tcp: OutSegs\n")
    assert fabric.read_tcp_counters(tmp_path / "garbled") is None
    report = fabric.compare(fabric.FabricSnapshot(tcp=None), fabric.FabricSnapshot(tcp=same))
    assert report["tcp"] is None
    assert any("unknown" in line for line in fabric.describe(report))


def test_infiniband_absent_reports_none_present(tmp_path):
    snapshot = fabric.snapshot(snmp_path=tmp_path / "missing", infiniband_root=tmp_path / "no-infiniband")
    report = fabric.compare(snapshot, snapshot)
    assert report["infiniband"] == {"present": False, "ports": [], "errors": {}, "error_total": 0}
    assert any(line.endswith("InfiniBand errors    : none present") for line in fabric.describe(report))


def test_infiniband_error_counters_that_grew_are_reported(tmp_path):
    root = tmp_path / "infiniband"
    write_port(root, "mlx5_0", 1, symbol_error=3, link_downed=0, port_rcv_errors=5, port_xmit_data=123)
    write_port(root, "mlx5_1", 1, symbol_error=0, port_rcv_errors=0)
    before = fabric.snapshot(snmp_path=tmp_path / "missing", infiniband_root=root)
    assert "mlx5_0/1/port_xmit_data" not in before.infiniband  # a data counter, not an error
    write_port(root, "mlx5_0", 1, symbol_error=4, link_downed=1, port_rcv_errors=2)  # rcv_errors was reset
    after = fabric.snapshot(snmp_path=tmp_path / "missing", infiniband_root=root)
    report = fabric.compare(before, after)["infiniband"]
    assert report["present"] and report["ports"] == ["mlx5_0/1", "mlx5_1/1"]
    assert report["errors"] == {"mlx5_0/1/symbol_error": 1, "mlx5_0/1/link_downed": 1, "mlx5_0/1/port_rcv_errors": 2}
    assert report["error_total"] == 4
    line = fabric.describe(fabric.compare(before, after))[-1]
    assert "4 FAILED" in line and "mlx5_0/1/link_downed +1" in line
    clean = fabric.describe(fabric.compare(after, after))[-1]
    assert clean.endswith(": 0 OK (2 ports)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/snmp is Linux's")
def test_this_machine_has_readable_tcp_counters():
    counters = fabric.read_tcp_counters()
    assert counters is not None and counters.out_segments >= 0 and counters.retransmitted_segments >= 0
