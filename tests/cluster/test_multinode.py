"""Multi-node training for real, on one machine: separate torchrun agents joined by c10d rendezvous.

- two `gonogo train --nnodes 2 --node-rank 0|1` agents train the same losses as one `--nproc 2` agent;
- a node whose peer never comes fails with a clear error within its join timeout;
- the Slurm script of `gonogo launch --target slurm` runs with bash (fake srun / scontrol) and trains;
- two network namespaces joined by a veth pair act as two hosts (skipped where netns is not allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gonogo.cluster.torchrun import free_port
from gonogo.cluster.launch import LaunchSpec, slurm_script

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=128",
        "model.max_seq_len=64", "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.val_batches=1", "train.checkpoint=false", "train.steps=6", "train.log_every=2",
        "train.val_every=0", "train.warmup_steps=2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env["OMP_NUM_THREADS"] = "1"   # the same threads in every run: fp32 matmuls then agree bitwise
    env.update(extra)
    return env


def _train(out: Path, *flags: str, prefix: tuple[str, ...] = (), env=None) -> subprocess.Popen:
    argv = [*prefix, sys.executable, "-m", "gonogo", "train", "tiny-dense", "--deterministic", "--out", str(out),
            *flags, *TINY]
    return subprocess.Popen(argv, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{output[-3000:]}")
    return process.returncode, output


def _rank0_losses(*runs: Path) -> list[float]:
    """Rank 0's losses, from whichever node's run directory rank 0 wrote them to."""
    losses = []
    for run in runs:
        for line in (run / "events.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("rank") == 0 and "loss" in record:
                losses.append(record["loss"])
    return losses


def _nodes(out: Path, endpoint: str, prefixes=((), ()), envs=(None, None)) -> list[subprocess.Popen]:
    run_id = uuid.uuid4().hex[:8]
    return [_train(out / f"node{rank}", "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
                   "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--join-timeout", "120",
                   prefix=prefixes[rank], env=envs[rank])
            for rank in (0, 1)]


@pytest.mark.slow
def test_two_agents_train_the_same_losses_as_one_agent_with_two_processes(tmp_path):
    # all three agents at once: contention changes timings, never fp32 results with fixed threads
    nodes = _nodes(tmp_path, f"127.0.0.1:{free_port()}")
    single = _train(tmp_path / "single", "--nproc", "2")
    results = [_finish(process) for process in (*nodes, single)]
    for code, output in results:
        assert code == 0, output[-3000:]
    multi_node = _rank0_losses(tmp_path / "node0", tmp_path / "node1")
    one_node = _rank0_losses(tmp_path / "single")
    assert len(one_node) == 3 and multi_node == one_node
    result = json.loads(next(tmp_path.glob("node*/stages/train/result.json")).read_text())
    assert result["world_size"] == 2
    assert any("rank 0's node writes the metrics" in output for _, output in results[:2])


def test_a_node_whose_peer_never_joins_fails_clearly_within_the_join_timeout(tmp_path):
    started = time.monotonic()
    process = _train(tmp_path / "alone", "--nproc", "1", "--nnodes", "2", "--node-rank", "0",
                     "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "lonely", "--join-timeout", "4")
    code, output = _finish(process, timeout=120)
    assert code == 1
    assert "could not join the rendezvous" in " ".join(output.split())
    assert time.monotonic() - started < 90


def _fake_slurm_bin(folder: Path) -> Path:
    folder.mkdir()
    (folder / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo localhost; exit 0; fi\n'
        'echo "fake scontrol: unexpected $*" >&2; exit 1\n')
    # srun: drop its own options, run the command once here as node 0 of the allocation
    (folder / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexport SLURM_NODEID=0 SLURM_PROCID=0\nexec "$@"\n')
    (folder / "gonogo").write_text(f'#!/bin/bash\nexec {sys.executable} -m gonogo "$@"\n')
    for name in ("scontrol", "srun", "gonogo"):
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.slow
def test_the_generated_slurm_script_trains_with_two_gloo_processes(tmp_path):
    shared = tmp_path / "shared"
    spec = LaunchSpec(config="tiny-dense", nodes=1, gpus_per_node=2, shared_dir=str(shared), name="slurm-cpu",
                      overrides=[item for item in TINY if not item.startswith("train.steps")] + ["train.steps=4"],
                      env={"OMP_NUM_THREADS": "1"}, max_restarts=0)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(spec))
    fake_bin = _fake_slurm_bin(tmp_path / "bin")
    env = _env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(tmp_path), RDZV_PORT=str(free_port()))
    completed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=240,
                               cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    result = json.loads((shared / "runs" / "slurm-cpu" / "stages" / "train" / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4 and result["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_generated_doctor_job_gathers_two_nodes_into_one_table(tmp_path):
    """`gonogo launch --target slurm --job doctor`: a fake srun starts the node command twice here
    (node 0 and node 1, as two nodes of the allocation would); both print the one table, GO."""
    shared = tmp_path / "shared"
    spec = LaunchSpec(config="", nodes=2, gpus_per_node=1, shared_dir=str(shared), name="doctor-cpu", job="doctor",
                      join_timeout_s=60, doctor_size_MB=1)
    script = tmp_path / "doctor.sbatch"
    script.write_text(slurm_script(spec))
    fake_bin = _fake_slurm_bin(tmp_path / "bin")
    (fake_bin / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'SLURM_NODEID=0 "$@" & first=$!\nSLURM_NODEID=1 "$@" & second=$!\n'
        'wait $first; a=$?; wait $second; b=$?\nexit $(( a > b ? a : b ))\n')
    env = _env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(tmp_path), RDZV_PORT=str(free_port()))
    completed = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=180,
                               cwd=tmp_path)
    output = " ".join(completed.stdout.split())
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert output.count("gonogo doctor: 2 of 2 nodes") == 2 and output.count("GO: every node answered") == 2
    # each node ran the doctor stage into its own run directory under the submit folder
    assert sorted(run.name.rsplit("-", 1)[1] for run in (tmp_path / "runs").iterdir()) == ["node0", "node1"]


# -- two hosts: network namespaces joined by a veth pair --------------------------------------------

def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces gonogo-a-X (10.77.N.1) and gonogo-b-X (10.77.N.2) on a private veth link."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = uuid.uuid4().hex[:6]
    names = (f"gonogo-a-{tag}", f"gonogo-b-{tag}")
    links = (f"gna{tag}", f"gnb{tag}")
    subnet = f"10.77.{int(tag, 16) % 250 + 1}"
    if _ip("netns", "add", names[0]).returncode != 0:
        pytest.skip("network namespaces are not permitted in this sandbox")
    try:
        steps = [("netns", "add", names[1]),
                 ("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for index, (name, link) in enumerate(zip(names, links)):
            steps += [("link", "set", link, "netns", name),
                      ("-n", name, "addr", "add", f"{subnet}.{index + 1}/24", "dev", link),
                      ("-n", name, "link", "set", link, "up"),
                      ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"ip {' '.join(step)} is not permitted here: {done.stderr.strip()}")
        yield [{"netns": name, "link": link, "addr": f"{subnet}.{index + 1}"}
               for index, (name, link) in enumerate(zip(names, links))]
    finally:
        for name in names:
            _ip("netns", "del", name)   # deleting a namespace removes its end of the veth pair too


@pytest.mark.slow
def test_two_network_namespaces_train_as_two_hosts(tmp_path, two_hosts):
    head = two_hosts[0]["addr"]
    prefixes = tuple(("ip", "netns", "exec", host["netns"]) for host in two_hosts)
    # each host announces its own address (torchrun's --local-addr via PET_LOCAL_ADDR) and gloo uses its link
    envs = tuple(_env(PET_LOCAL_ADDR=host["addr"], GLOO_SOCKET_IFNAME=host["link"]) for host in two_hosts)
    nodes = _nodes(tmp_path, f"{head}:{free_port()}", prefixes=prefixes, envs=envs)
    for code, output in [_finish(process) for process in nodes]:
        assert code == 0, output[-3000:]
    assert len(_rank0_losses(tmp_path / "node0", tmp_path / "node1")) == 3


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "needs --rdzv-endpoint"),
    (["--nnodes", "two", "--rdzv-endpoint", "127.0.0.1:1"], "--nnodes two"),
])
def test_multinode_flag_mistakes_are_one_line_exit_2(tmp_path, flags, message):
    from tests.conftest import run_gonogo

    result = run_gonogo("train", "tiny-dense", "--nproc", "1", *flags, "--out", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_node_zero_hosts_the_rendezvous_store_and_the_flags_reach_torchrun():
    import argparse

    from gonogo.cluster.torchrun import torchrun_command
    from gonogo.stages.train.stage import add_arguments, rendezvous_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for rank, host in ((0, 1), (1, 0)):
        args = parser.parse_args(["tiny-dense", "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint",
                                  "10.0.0.1:29500", "--rdzv-id", "job", "--join-timeout", "30"])
        argv = torchrun_command("gonogo.train.worker", ["job.json"], 8, **rendezvous_options(args))
        assert f"--rdzv-conf=join_timeout=30,is_host={host}" in argv
        assert {"--nnodes=2", f"--node-rank={rank}", "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=job"} <= set(argv)
