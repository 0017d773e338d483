"""Generated Slurm and Kubernetes files: they parse, carry what each resource needs, and bad input is one line."""

import subprocess

import pytest
import yaml

from gonogo.cluster.launch import LaunchSpec, indexed_job, pytorchjob, slurm_script
from tests.conftest import run_gonogo


def spec(**changes):
    values = dict(config="tiny-dense", nodes=2, gpus_per_node=8, image="registry.example/gonogo:1", overrides=["train.steps=5"])
    values.update(changes)
    return LaunchSpec(**values)


def _container_ok(container, gpus, nodes=2):
    assert container["name"] and container["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "NCCL_DEBUG" in env and env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert all(isinstance(e["value"], str) for e in container["env"])   # k8s EnvVar.value is a string
    command = container["command"][-1]
    assert f"gonogo train tiny-dense --nproc 8 --nnodes {nodes}" in command and "--resume auto" in command
    assert any(m["mountPath"] == "/shared/gonogo" for m in container["volumeMounts"])


def test_pytorchjob_has_the_required_fields():
    document = yaml.safe_load(yaml.safe_dump(pytorchjob(spec())))
    assert document["apiVersion"] == "kubeflow.org/v1" and document["kind"] == "PyTorchJob"
    assert document["metadata"]["name"] == "gonogo-train"
    replicas = document["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        _container_ok(pod["containers"][0], 8)
        assert {v["name"] for v in pod["volumes"]} == {"shared", "dshm"}
        assert '--node-rank "$RANK"' in pod["containers"][0]["command"][-1]


def test_single_node_pytorchjob_has_no_workers():
    assert "Worker" not in pytorchjob(spec(nodes=1))["spec"]["pytorchReplicaSpecs"]


def test_indexed_job_and_headless_service():
    service, job = yaml.safe_load_all(yaml.safe_dump_all(indexed_job(spec(nodes=4))))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == job["spec"]["template"]["metadata"]["labels"]
    _container_ok(pod["containers"][0], 8, nodes=4)
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]


def test_slurm_script_is_valid_bash_with_the_directives():
    script = slurm_script(spec(partition="gpu"))
    for directive in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--requeue", "--partition=gpu"):
        assert f"#SBATCH {directive}" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "exit 93" in script


@pytest.mark.parametrize("args, message", [
    (["--target", "slurm", "tiny-dense", "--gpus-per-node", "8"], "--nodes is required"),
    (["--target", "slurm", "tiny-dense", "--nodes", "2"], "--gpus-per-node is required"),
    (["--target", "k8s", "tiny-dense", "--nodes", "2", "--gpus-per-node", "8"], "--image is required"),
    (["--target", "slurm", "tiny-dense", "--nodes", "0", "--gpus-per-node", "8"], "--nodes must be >= 1"),
])
def test_missing_required_options_are_one_line_exit_2(tmp_path, args, message):
    result = run_gonogo("launch", *args, "--out", tmp_path / "launch")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_writes_the_files(tmp_path):
    result = run_gonogo("launch", "--target", "k8s", "tiny-dense", "--nodes", "2", "--gpus-per-node", "8",
                        "--image", "img:1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gonogo-train.pytorchjob.yaml").is_file() and (tmp_path / "gonogo-train.job.yaml").is_file()
