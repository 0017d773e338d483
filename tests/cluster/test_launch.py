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


# -- hostile input: quoted where it is a shell word, refused where it cannot be quoted -------------

HOSTILE = ['x"; touch PWNED; echo "', "x'; touch PWNED; echo '", "$(touch PWNED)", "`touch PWNED`",
           "x && touch PWNED"]


def _fake_tools(bin_dir, argv_file):
    """gonogo records its arguments; srun runs its command; scontrol answers like Slurm."""
    bin_dir.mkdir()
    tools = {"gonogo": f'#!/bin/bash\nprintf "%s\\n" "$@" > {argv_file}\n',
             "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
             "scontrol": '#!/bin/bash\necho node-0\n'}
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_config_overrides_and_env_values_are_quoted_not_run(tmp_path, hostile):
    import os

    shared = tmp_path / "shared"
    argv_file = tmp_path / "argv.txt"
    _fake_tools(tmp_path / "bin", argv_file)
    hostile_spec = spec(config=hostile, overrides=[f"train.note={hostile}"], env={"GONOGO_NOTE": hostile},
                        shared_dir=str(shared))
    hostile_spec.validate("slurm")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(work),
           "SLURM_JOB_ID": "7", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node-0", "SLURM_NNODES": "1"}
    done = subprocess.run(["bash", "-c", slurm_script(hostile_spec)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    argv = argv_file.read_text().splitlines()
    assert argv[:2] == ["train", hostile] and f"train.note={hostile}" in argv  # arrived as literal words
    # the Kubernetes command is the same shell line: run it as the pod would
    argv_file.unlink()
    command = pytorchjob(hostile_spec)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]["command"]
    done = subprocess.run(command, cwd=work, env={**env, "RANK": "0", "MASTER_ADDR": "m", "MASTER_PORT": "1"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert argv_file.read_text().splitlines()[1] == hostile
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("field, value", [
    ("partition", "gpu\n#SBATCH --uid=0"), ("partition", 'gpu"; rm -rf /'), ("account", "a$(id)"),
    ("time_limit", "04:00:00\nrm -rf /"), ("shared_dir", "/shared\nrm -rf /"), ("shared_dir", "/shared/`id`"),
    ("shared_dir", "relative/dir"), ("shared_dir", "/shared/../etc"), ("name", "job\nrm"), ("namespace", "a;b"),
    ("env", {"A;rm -rf /": "1"}), ("env", {"A\nB": "1"}), ("env", {"OK": "line\nrm -rf /"}),
    ("config", "tiny\nrm -rf /"), ("overrides", ["train.steps=1\nrm -rf /"]), ("image", "img\nx"),
])
def test_hostile_fields_that_cannot_be_quoted_are_refused(field, value):
    from gonogo.errors import UserError

    with pytest.raises(UserError) as refused:
        spec(**{field: value}).validate("slurm")
    assert "\n" not in str(refused.value).replace("\\n", "")


def test_hostile_env_key_on_the_command_line_is_one_line_exit_2(tmp_path):
    result = run_gonogo("launch", "--target", "slurm", "tiny-dense", "--nodes", "1", "--gpus-per-node", "1",
                        "--env", "X=1; rm -rf /", "--env", "BAD KEY=1", "--out", tmp_path / "launch")
    assert result.returncode == 2 and "'BAD KEY' is not an environment variable name" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "launch").exists()


def test_doctor_job_runs_the_doctor_of_many_nodes_once_in_every_form():
    doctor = spec(config="", overrides=[], job="doctor", shared_dir="/shared/doctor")
    script = slurm_script(doctor)
    assert "#SBATCH --no-requeue" in script and "#SBATCH --requeue" not in script
    assert ('gonogo doctor --nnodes 2 --node-rank "$SLURM_NODEID" --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" '
            "--join-timeout 300 --path /shared/doctor --size-MB 256") in script
    assert '-lt 0 ]' in script and subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    job = pytorchjob(doctor)
    assert job["spec"]["runPolicy"]["backoffLimit"] == 0
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "Never"
        assert '--node-rank "$RANK" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in \
            replica["template"]["spec"]["containers"][0]["command"][-1]
    _, indexed = indexed_job(doctor)
    assert indexed["spec"]["backoffLimit"] == 0
    assert ('gonogo doctor --nnodes 2 --node-rank "$JOB_COMPLETION_INDEX" --rdzv-endpoint '
            'gonogo-train-0.gonogo-train-rdzv:29500') in indexed["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    # the training forms are unchanged
    assert "#SBATCH --requeue" in slurm_script(spec()) and pytorchjob(spec())["spec"]["runPolicy"]["backoffLimit"] == 3


@pytest.mark.parametrize("args, message", [
    (["--target", "slurm", "--job", "doctor", "tiny-dense", "--nodes", "2", "--gpus-per-node", "8"],
     "--job doctor takes no training config"),
    (["--target", "slurm", "--nodes", "2", "--gpus-per-node", "8"], "a training config is required"),
    (["--target", "slurm", "--job", "doctor", "--nodes", "2", "--gpus-per-node", "8", "--join-timeout", "0"],
     "--join-timeout must be > 0"),
])
def test_doctor_job_mistakes_are_one_line_exit_2(tmp_path, args, message):
    result = run_gonogo("launch", *args, "--out", tmp_path / "launch")
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
