import argparse
import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest
from tests.conftest import run_gonogo

import gonogo.stages.doctor.stage as doctor
from gonogo.cli import main
from gonogo.cluster import gpu_health
from gonogo.rundir import RunDir
from gonogo.stages.base import StageContext

REQUIRED_METRICS = {"gpu_count", "cpu_count", "memory_GB", "storage_write_GBps", "storage_read_GBps",
                    "disk_free_GB", "ecc_errors", "gpu_max_temperature_C", "gpu_throttled"}


# -- a fake NVML: the few pynvml names the probe uses, driven by plain dicts ----------------------

class FakeNVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {3: "Not Supported", 9: "Driver Not Loaded", 15: "GPU is lost"}.get(self.value, f"code {self.value}")


def healthy_gpu(**changes):
    gpu = {
        "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0", "memory": 80 * 10**9, "capability": (9, 0),
        "temperature": 41, "power_mW": 120_000, "power_limit_mW": 700_000,
        # (error type, counter) -> count; error type 0 corrected, 1 uncorrected; counter 0 volatile, 1 aggregate
        "ecc": {(0, 0): 3, (1, 0): 0, (0, 1): 12, (1, 1): 0},
        "throttle": 0x1 | 0x4,  # idle and power cap: normal operation
        "nvlink": [1, 1, 1, 1],
    }
    gpu.update(changes)
    return gpu


class FakeNVML:
    NVMLError = FakeNVMLError
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_VOLATILE_ECC = 0
    NVML_AGGREGATE_ECC = 1
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_MAX_LINKS = 6

    def __init__(self, gpus, init_error=None):
        self.gpus = gpus
        self.init_error = init_error
        self.shut_down = False

    @staticmethod
    def _value(value):
        if isinstance(value, FakeNVMLError):
            raise value
        return value

    def nvmlInit(self):
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetNVMLVersion(self):
        return b"12.550.54.15"  # old pynvml returned bytes

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu):
        return gpu["name"]

    def nvmlDeviceGetUUID(self, gpu):
        return gpu["uuid"]

    def nvmlDeviceGetMemoryInfo(self, gpu):
        return SimpleNamespace(total=self._value(gpu["memory"]))

    def nvmlDeviceGetCudaComputeCapability(self, gpu):
        return gpu["capability"]

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        return self._value(gpu["temperature"])

    def nvmlDeviceGetPowerUsage(self, gpu):
        return self._value(gpu["power_mW"])

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu):
        return self._value(gpu["power_limit_mW"])

    def nvmlDeviceGetEccMode(self, gpu):
        return [1, 1]

    def nvmlDeviceGetTotalEccErrors(self, gpu, error_type, counter):
        return self._value(gpu["ecc"][(error_type, counter)])

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu):
        return self._value(gpu["throttle"])

    def nvmlDeviceGetNvLinkState(self, gpu, link):
        if isinstance(gpu["nvlink"], FakeNVMLError):
            raise gpu["nvlink"]
        if link >= len(gpu["nvlink"]):
            raise FakeNVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return gpu["nvlink"][link]


NOT_SUPPORTED = FakeNVMLError(3)


# -- throttle reasons ------------------------------------------------------------------------------

def test_throttle_reasons_are_decoded_to_names():
    assert gpu_health.decode_throttle_reasons(0) == []
    assert gpu_health.decode_throttle_reasons(0x1 | 0x4 | 0x40) == ["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]
    assert gpu_health.decode_throttle_reasons(0x8 | 0x10000) == ["hw_slowdown", "unknown_0x10000"]


def test_throttle_reason_bits_match_the_real_nvml_bindings():
    real = {
        pynvml.nvmlClocksThrottleReasonGpuIdle: "gpu_idle",
        pynvml.nvmlClocksThrottleReasonApplicationsClocksSetting: "applications_clocks_setting",
        pynvml.nvmlClocksThrottleReasonSwPowerCap: "sw_power_cap",
        pynvml.nvmlClocksThrottleReasonHwSlowdown: "hw_slowdown",
        pynvml.nvmlClocksThrottleReasonSyncBoost: "sync_boost",
        pynvml.nvmlClocksThrottleReasonSwThermalSlowdown: "sw_thermal_slowdown",
        pynvml.nvmlClocksThrottleReasonHwThermalSlowdown: "hw_thermal_slowdown",
        pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown: "hw_power_brake_slowdown",
        pynvml.nvmlClocksThrottleReasonDisplayClockSetting: "display_clock_setting",
    }
    assert gpu_health.THROTTLE_REASONS == real


# -- NVML probe and health verdict with a fake NVML -------------------------------------------------

def test_healthy_gpus_pass_every_check():
    nvml = FakeNVML([healthy_gpu(), healthy_gpu(uuid="GPU-1", temperature=55)])
    report = gpu_health.probe_gpus(nvml)

    assert nvml.shut_down
    assert report["available"] and report["gpu_count"] == 2
    assert report["driver_version"] == "550.54.15" and report["cuda_driver_version"] == "12.4"
    assert report["nvml_version"] == "12.550.54.15"
    first = report["gpus"][0]
    assert first["memory_GB"] == 80.0 and first["compute_capability"] == "9.0"
    assert first["power_W"] == 120.0 and first["power_limit_W"] == 700.0
    assert first["ecc"]["volatile"] == {"corrected": 3, "uncorrected": 0}
    assert first["ecc"]["aggregate"] == {"corrected": 12, "uncorrected": 0}
    assert first["throttle"]["reasons"] == ["gpu_idle", "sw_power_cap"]
    assert [link["state"] for link in first["nvlink"]] == ["up"] * 4
    assert gpu_health.health_problems(report) == []
    assert gpu_health.summary_metrics(report) == {
        "ecc_errors": 0, "gpu_max_temperature_C": 55, "gpu_throttled": False, "nvlink_links_down": 0}


def test_uncorrected_ecc_thermal_throttling_and_a_down_link_fail_health():
    bad = healthy_gpu(ecc={(0, 0): 0, (1, 0): 2, (0, 1): 0, (1, 1): 7}, throttle=0x40, nvlink=[1, 0, 1, 1])
    report = gpu_health.probe_gpus(FakeNVML([healthy_gpu(), bad]))

    problems = gpu_health.health_problems(report)
    assert len(problems) == 3
    assert all(problem.startswith("GPU 1 (NVIDIA H100 80GB HBM3)") for problem in problems)
    assert "2 uncorrected ECC" in problems[0]  # volatile (since driver load), not lifetime
    assert "hw_thermal_slowdown" in problems[1]
    assert "NVLink link(s) 1 not up" in problems[2]
    assert gpu_health.summary_metrics(report) == {
        "ecc_errors": 2, "gpu_max_temperature_C": 41, "gpu_throttled": True, "nvlink_links_down": 1}


class FakeNVMLWithPeers(FakeNVML):
    NVML_NVLINK_DEVICE_TYPE_GPU = 0
    NVML_NVLINK_DEVICE_TYPE_UNKNOWN = 0xFF

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, gpu, link):
        return self._value(gpu["nvlink_peer"][link])


def test_disabled_nvlink_ports_are_not_down_but_an_inactive_wired_one_is():
    unknown, peer_gpu = FakeNVMLWithPeers.NVML_NVLINK_DEVICE_TYPE_UNKNOWN, FakeNVMLWithPeers.NVML_NVLINK_DEVICE_TYPE_GPU
    # a board that wires 4 of its 6 ports: the other 2 are inactive with no peer
    partly_wired = healthy_gpu(nvlink=[1, 1, 1, 1, 0, 0], nvlink_peer=[peer_gpu] * 4 + [unknown] * 2)
    report = gpu_health.probe_gpus(FakeNVMLWithPeers([partly_wired]))
    assert [link["state"] for link in report["gpus"][0]["nvlink"]] == ["up"] * 4 + ["disabled"] * 2
    assert gpu_health.health_problems(report) == []
    assert gpu_health.summary_metrics(report)["nvlink_links_down"] == 0

    broken = healthy_gpu(nvlink=[1, 0, 1, 1, 0, 0], nvlink_peer=[peer_gpu] * 4 + [unknown] * 2)
    report = gpu_health.probe_gpus(FakeNVMLWithPeers([broken]))
    assert gpu_health.health_problems(report) == ["GPU 0 (NVIDIA H100 80GB HBM3): NVLink link(s) 1 not up"]
    assert gpu_health.summary_metrics(report)["nvlink_links_down"] == 1


def test_missing_features_read_unsupported_and_do_not_crash():
    gpu = healthy_gpu(ecc={key: NOT_SUPPORTED for key in [(0, 0), (1, 0), (0, 1), (1, 1)]},
                      throttle=NOT_SUPPORTED, nvlink=NOT_SUPPORTED, power_mW=NOT_SUPPORTED,
                      temperature=FakeNVMLError(999))
    report = gpu_health.probe_gpus(FakeNVML([gpu]))

    device = report["gpus"][0]
    assert device["ecc"]["volatile"] == {"corrected": "unsupported", "uncorrected": "unsupported"}
    assert device["throttle"]["reasons"] == "unsupported"
    assert device["nvlink"] == "unsupported"
    assert device["power_W"] == "unsupported"
    assert device["temperature_C"] == "error: code 999"
    assert gpu_health.health_problems(report) == []
    # what could not be read is unknown, with the reason, never 0 / false / healthy
    metrics = gpu_health.summary_metrics(report)
    assert {name: metrics[name] for name in ("ecc_errors", "gpu_max_temperature_C", "gpu_throttled",
                                             "nvlink_links_down")} == dict.fromkeys(
        ["ecc_errors", "gpu_max_temperature_C", "gpu_throttled", "nvlink_links_down"])
    assert metrics["unknown"]["ecc_errors"] == "GPU 0 (NVIDIA H100 80GB HBM3): ECC error counters not readable (unsupported)"
    assert "unsupported" in metrics["unknown"]["nvlink_links_down"]
    unknowns = gpu_health.health_unknowns(report)
    assert len(unknowns) == 3 and not any("NVLink" in u for u in unknowns)  # no NVLink says nothing of health


def test_aggregate_ecc_counts_when_volatile_is_unsupported():
    gpu = healthy_gpu(ecc={(0, 0): NOT_SUPPORTED, (1, 0): NOT_SUPPORTED, (0, 1): 0, (1, 1): 1})
    report = gpu_health.probe_gpus(FakeNVML([gpu]))
    assert gpu_health.summary_metrics(report)["ecc_errors"] == 1


def test_a_lost_gpu_is_unhealthy():
    report = gpu_health.probe_gpus(FakeNVML([healthy_gpu(temperature=FakeNVMLError(15))]))
    assert "GPU is lost" in report["gpus"][0]["temperature_C"]
    assert any("lost" in problem for problem in gpu_health.health_problems(report))


def test_nvml_that_cannot_start_is_reported_not_raised():
    report = gpu_health.probe_gpus(FakeNVML([], init_error=9))
    assert report == {"available": False, "reason": "NVML not available: Driver Not Loaded",
                      "gpu_count": 0, "gpus": [], "pci_nvidia_gpus": gpu_health.nvidia_pci_devices()}
    # the real bindings on this driverless machine take the same path
    real = gpu_health.probe_gpus()
    if not real["available"]:
        assert real["reason"].startswith("NVML not available: ") and real["gpu_count"] == 0


def test_pci_scan_counts_nvidia_display_controllers_only(tmp_path):
    for name, vendor, device_class in (("a", "0x10de", "0x030200"), ("b", "0x10de", "0x068000"),
                                       ("c", "0x8086", "0x030000"), ("d", "0x10de", "0x030000")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
        (tmp_path / name / "class").write_text(device_class + "\n")
    assert gpu_health.nvidia_pci_devices(tmp_path) == 2   # the NVSwitch bridge (0x0680) is no GPU
    assert gpu_health.nvidia_pci_devices(tmp_path / "missing") is None


def _nvml_raises_on_a_gpu_node(monkeypatch, **fake):
    """A node whose PCI bus lists 8 NVIDIA GPUs while NVML raises (a broken or unloaded driver)."""
    real_probe = gpu_health.probe_gpus
    broken = FakeNVML([], init_error=9) if not fake else FakeNVML(**fake)
    monkeypatch.setattr(gpu_health, "nvidia_pci_devices", lambda root=None: 8)
    monkeypatch.setattr(gpu_health, "probe_gpus", lambda nvml=None: real_probe(broken))


def _doctor_cli(tmp_path, out: str, *flags: str) -> int:
    """``gonogo doctor`` in this process (a fake NVML stays patched in), into ``tmp_path/out``."""
    return main(["doctor", "--path", str(tmp_path / "probe"), "--size-MB", "1", "--out", str(tmp_path / out), *flags])


def _verdict(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_doctor_with_an_nvml_that_raises_reports_unknown_and_exits_1(tmp_path, monkeypatch, capsys):
    _nvml_raises_on_a_gpu_node(monkeypatch)
    assert _doctor_cli(tmp_path, "json", "--json") == 1
    document = json.loads(capsys.readouterr().out)
    # unknown never passes: the default gate healthy == true fails as not measured
    summary = _verdict(tmp_path / "json")
    assert summary["verdict"] == "NO-GO" and [g["expression"] for g in summary["gates"]] == ["healthy == true"]
    assert "not measured" in summary["gates"][0]["reason"]
    assert document["healthy"] is None and document["problems"] == []
    metrics = document["metrics"]
    for name in ("healthy", "gpu_count", "ecc_errors", "gpu_throttled", "nvlink_links_down"):
        assert metrics[name] is None, name
        assert "Driver Not Loaded" in metrics["unknown"][name] or "unknown" in metrics["unknown"][name], name
    assert "the PCI bus lists 8 NVIDIA GPU(s)" in metrics["unknown"]["healthy"]
    assert _doctor_cli(tmp_path, "tables") == 1
    output = capsys.readouterr().out
    assert "unknown:" in output and "Driver Not Loaded" in output and "health unknown" in output
    assert "healthy: every check passed" not in output


def test_nvml_whose_every_query_raises_is_unknown_not_healthy(tmp_path, monkeypatch):
    error = FakeNVMLError(999)
    gpu = healthy_gpu(temperature=error, power_mW=error, throttle=error, nvlink=error,
                      ecc={key: error for key in [(0, 0), (1, 0), (0, 1), (1, 1)]})
    _nvml_raises_on_a_gpu_node(monkeypatch, gpus=[gpu])
    document = doctor.diagnose(tmp_path, 1)
    assert document["healthy"] is None and document["gpu_count"] == 1
    assert document["metrics"]["ecc_errors"] is None and document["metrics"]["gpu_throttled"] is None
    assert "code 999" in document["metrics"]["unknown"]["ecc_errors"]


def test_a_cpu_machine_is_healthy_with_gpu_metrics_unknown(tmp_path, monkeypatch):
    """No NVIDIA GPU on the PCI bus: nothing to check, so health rests on the other checks; the GPU
    metrics are still unknown, so a gate such as ecc_errors == 0 cannot pass there."""
    real_probe = gpu_health.probe_gpus
    monkeypatch.setattr(gpu_health, "nvidia_pci_devices", lambda root=None: 0)
    monkeypatch.setattr(gpu_health, "probe_gpus", lambda nvml=None: real_probe(FakeNVML([], init_error=9)))
    monkeypatch.setattr(doctor, "torch_info", lambda: {
        "version": "2.13.0+cpu", "cuda_build": None, "hip_build": None, "cuda_available": False,
        "devices": [], "nccl_version": None, "cudnn_version": None})
    document = doctor.diagnose(tmp_path, 1)
    assert document["healthy"] is True and document["gpu_count"] == 0
    assert document["metrics"]["ecc_errors"] is None
    assert document["metrics"]["unknown"]["ecc_errors"].startswith("no NVIDIA GPU on this machine")


# -- inventory, stage and command ------------------------------------------------------------------

def test_inventory_on_cpu_says_no_gpu():
    document = doctor.inventory(FakeNVML([], init_error=9))
    assert document["host"]["hostname"] and document["host"]["os"] and document["host"]["python"]
    assert document["cpu"]["model"] and document["cpu"]["logical_cores"] >= 1
    assert document["cpu"]["usable_cores"] >= 1
    assert document["memory"]["total_GB"] > 0
    assert document["torch"]["version"]
    if not document["torch"]["cuda_available"]:
        assert document["gpu_count"] == 0
        assert document["accelerator"].startswith("no GPU")
        assert document["torch"]["nccl_version"] is None


def test_torch_without_cuda_on_a_gpu_node_is_a_warning(monkeypatch):
    monkeypatch.setattr(doctor, "torch_info", lambda: {
        "version": "2.13.0+cpu", "cuda_build": None, "hip_build": None, "cuda_available": False,
        "devices": [], "nccl_version": None, "cudnn_version": None})
    document = doctor.inventory(FakeNVML([healthy_gpu()]))
    assert document["gpu_count"] == 1
    assert "torch cannot use CUDA" in document["warnings"][0]


def test_stage_writes_doctor_json_and_declared_metrics(tmp_path):
    run_dir = RunDir.create(tmp_path / "run", "laptop")
    settings = doctor.DoctorSettings(storage_size_MB=2)
    ctx = StageContext(name="doctor", kind="doctor", run_dir=run_dir, stage_dir=run_dir.stage_dir("doctor"))

    metrics = doctor.STAGE.run(ctx, settings)

    assert set(metrics) - {"unknown"} == doctor.STAGE.metrics(settings) >= REQUIRED_METRICS
    assert metrics["storage_write_GBps"] > 0 and metrics["disk_free_GB"] > 0
    assert list(run_dir.checkpoints_dir.iterdir()) == []  # probed there by default, then cleaned up
    saved = json.loads((ctx.stage_dir / "doctor.json").read_text())
    assert saved["metrics"] == metrics and saved["storage"]["size_MB"] == 2
    event = json.loads(run_dir.events_path.read_text().splitlines()[-1])
    assert event["stage"] == "doctor" and event["rank"] == 0 and event["storage_read_GBps"] == metrics["storage_read_GBps"]

    items = doctor.STAGE.report(ctx.stage_dir, metrics)
    titles = [item.title for item in items]
    assert titles == ["Machine inventory and storage", "GPU health (NVML)",
                      "Topology: GPU links (nvidia-smi topo -m legend) and NUMA affinity",
                      "Topology: sockets, NUMA nodes, caches, NICs", "Topology picture", "Health verdict"]
    inventory_items = {row["item"] for row in items[0].table}
    assert {"CPU", "memory", "torch", "Python", "accelerator", "storage write", "disk free"} <= inventory_items


def test_stage_settings_are_validated():
    with pytest.raises(ValueError):
        doctor.DoctorSettings(storage_size_MB=0)
    with pytest.raises(ValueError):
        doctor.DoctorSettings.model_validate({"storage_size": 10})


def test_command_exits_1_and_names_the_problem_when_a_gpu_is_unhealthy(tmp_path, monkeypatch, capsys):
    real_probe = gpu_health.probe_gpus
    sick = FakeNVML([healthy_gpu(throttle=0x8)])
    monkeypatch.setattr(gpu_health, "probe_gpus", lambda nvml=None: real_probe(sick))

    assert _doctor_cli(tmp_path, "tables") == 1
    captured = capsys.readouterr()
    assert "hw_slowdown" in captured.out and "GPU health" in captured.out
    assert "NO-GO" in captured.err and "NO-GO" not in captured.out  # the runner's verdict: stderr
    summary = _verdict(tmp_path / "tables")
    assert summary["verdict"] == "NO-GO" and summary["gates"][0]["passed"] is False

    assert _doctor_cli(tmp_path, "json", "--json") == 1
    document = json.loads(capsys.readouterr().out)
    assert document["healthy"] is False and document["metrics"]["gpu_throttled"] is True
    saved = json.loads((tmp_path / "json" / "stages" / "doctor" / "doctor.json").read_text())
    assert saved == document  # stdout is the document the stage wrote


def test_the_command_runs_the_stage_through_the_runner_into_a_run_directory(tmp_path, monkeypatch, capsys):
    real_probe = gpu_health.probe_gpus
    monkeypatch.setattr(gpu_health, "probe_gpus", lambda nvml=None: real_probe(FakeNVML([healthy_gpu()])))
    monkeypatch.chdir(tmp_path)
    assert main(["doctor", "--path", "probe", "--size-MB", "1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()  # the default run directory: runs/doctor-<time>/
    assert run.name.startswith("doctor-")
    assert {"plan.toml", "state.json", "events.jsonl", "summary.json", "report.html"} <= {p.name for p in run.iterdir()}
    plan = tomllib.loads((run / "plan.toml").read_text())
    assert plan["stage"][0]["kind"] == "doctor" and plan["stage"][0]["storage_path"] == "probe"
    assert plan["stage"][0]["gates"] == ["healthy == true"]
    assert json.loads((run / "stages" / "doctor" / "metrics.json").read_text())["healthy"] is True
    assert json.loads((run / "state.json").read_text())["stages"]["doctor"]["status"] == "passed"
    assert _verdict(run)["verdict"] == "GO"
    captured = capsys.readouterr()
    assert "healthy: every check passed" in captured.out and "GO" in captured.err


@pytest.mark.parametrize("flags, words", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0"], "expected HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--node-rank", "2"], "must be below nnodes"),
    (["--size-MB", "0"], "storage_size_MB"),
])
def test_bad_flags_are_one_line_exit_2_before_anything_is_created(flags, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["doctor", "--path", "probe", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_many_nodes_get_one_run_directory_each_by_default(tmp_path, monkeypatch):
    """The nodes of one job start at once in one shared folder: never one run directory for two."""
    from gonogo.stage_cli import add_arguments
    from gonogo.typed_config import validate

    parser = argparse.ArgumentParser()
    add_arguments(parser, "doctor")
    outs = []
    for rank in ("0", "1"):
        args = parser.parse_args(["--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--node-rank", rank])
        settings = validate(doctor.DoctorSettings, doctor.STAGE.command.settings(args), "test")
        doctor.STAGE.command.check(args, settings)
        outs.append(args.out)
    assert outs[0] != outs[1] and outs[0].parent == outs[1].parent == Path("runs")
    assert outs[1].name.startswith("doctor-") and outs[1].name.endswith("-node1")
    assert doctor.default_gates(settings) == ["nodes_all_answered == true", "nodes_all_healthy == true",
                                              "versions_identical == true"]


def test_cli_json_is_valid_and_has_the_metric_keys(tmp_path):
    result = run_gonogo("doctor", "--json", "--path", tmp_path / "probe", "--size-MB", "4", "--out", tmp_path / "run",
                        timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # stdout is the JSON alone; the runner's lines are on stderr
    assert "GO" in result.stderr and (tmp_path / "run" / "stages" / "doctor" / "metrics.json").is_file()
    assert REQUIRED_METRICS <= set(document["metrics"])
    assert document["healthy"] is True and document["problems"] == []
    assert {"host", "cpu", "memory", "torch", "nvml", "storage"} <= set(document)
    assert list((tmp_path / "probe").iterdir()) == []


def test_cli_table_says_no_gpu_and_an_unwritable_path_is_one_line_exit_2(tmp_path):
    result = run_gonogo("doctor", "--path", tmp_path / "probe", "--size-MB", "1", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "storage write" in result.stdout
    if doctor.inventory()["gpu_count"] == 0:
        assert "no GPU" in result.stdout
    assert len(list((tmp_path / "runs").iterdir())) == 1

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_gonogo("doctor", "--path", blocker / "sub", "--out", tmp_path / "refused", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(blocker / "sub") in result.stderr
    assert not (tmp_path / "refused").exists()  # refused before the run directory was made


def test_two_nodes_with_one_rank_fail_the_stage(tmp_path, monkeypatch):
    """N answered but one rank twice: no node metric shows it, so the stage fails with the reason."""
    from gonogo.cluster import nodes
    from gonogo.errors import StageFailed

    def node(rank):
        return {"node_rank": rank, "hostname": f"n{rank}", "time": 1.0, "healthy": True, "problems": [],
                "unknowns": [], "gpu_count": 0, "cpu_count": 2, "memory_GB": 1.0,
                "versions": {"driver": None, "cuda_driver": None, "cuda_build": None, "nccl": None, "torch": "2"}}

    view = nodes.cluster_view([node(0), node(1), node(1)], 3, "h:1", 5)
    assert view["metrics"]["nodes_all_answered"] is True and view["go"] is False
    monkeypatch.setattr(nodes, "gather", lambda *args, **kwargs: view)
    run_dir = RunDir.create(tmp_path / "run", "nodes")
    settings = doctor.DoctorSettings(storage_size_MB=1, nnodes=3, rdzv_endpoint="h:1")
    ctx = StageContext(name="doctor", kind="doctor", run_dir=run_dir, stage_dir=run_dir.stage_dir("doctor"))
    with pytest.raises(StageFailed, match=r"node rank\(s\) \[1\] answered twice"):
        doctor.STAGE.run(ctx, settings)
