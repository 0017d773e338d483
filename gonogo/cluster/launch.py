"""``gonogo launch``: the same training job as a Slurm batch script or Kubernetes manifests.

gonogo does not bring a launcher of its own to a cluster: it writes what the cluster's engine
runs. Every form runs the same command on each node,

    gonogo train CONFIG --nproc G --nnodes N --node-rank R --rdzv-endpoint HOST:PORT --rdzv-id ID
                        --out SHARED/runs/NAME --resume auto

which starts torchrun with a c10d rendezvous; a restarted or requeued job resumes from the newest
committed checkpoint on the shared volume. Exit code 2 (a mistake in the input) is never retried.

``--job doctor`` writes the same forms for the inventory of many nodes instead: every node runs
``gonogo doctor --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` (node 0 hosts the table), once
and never retried: its exit code is the verdict (0 GO, 1 NO-GO), and its log holds the node table.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gonogo.errors import UserError
from gonogo.names import check_dns_label, check_env_name, check_pattern, check_single_line

RDZV_PORT = 29500
DO_NOT_REQUEUE_EXIT = 93
NON_RECOVERABLE_EXITS = (2,)  # gonogo's exit code for a user's mistake: retrying cannot help

# NCCL settings most clusters start from; every one can be overridden with --env KEY=VALUE
DEFAULT_NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "NCCL_IB_TIMEOUT": "22",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "OMP_NUM_THREADS": "8",
}


@dataclass
class LaunchSpec:
    config: str                    # a preset word or a TOML path, as `gonogo train` takes it
    nodes: int
    gpus_per_node: int
    name: str = "gonogo-train"
    shared_dir: str = "/shared/gonogo"   # on shared storage: runs and checkpoints
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    image: str = ""
    namespace: str = "default"
    pvc: str = "gonogo-shared"
    cpus_per_node: int = 32
    memory: str = "512Gi"
    partition: str = ""
    account: str = ""
    time_limit: str = "04:00:00"
    max_restarts: int = 3
    job: str = "train"             # "train" or "doctor" (the inventory of many nodes)
    join_timeout_s: float = 300.0  # doctor: how long node 0 waits for every node
    doctor_size_MB: int = 256      # doctor: the storage probe of --shared-dir

    @property
    def retries(self) -> int:
        return self.max_restarts if self.job == "train" else 0  # a doctor's NO-GO is its answer

    def validate(self, target: str) -> None:
        if self.nodes < 1:
            raise UserError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise UserError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")
        if self.job not in ("train", "doctor"):
            raise UserError(f"--job {self.job!r}: expected train or doctor")
        if self.job == "train" and not self.config:
            raise UserError("a training config is required (a preset word or a TOML path), e.g. tiny-dense")
        if self.job == "doctor" and (self.config or self.overrides):
            raise UserError("--job doctor takes no training config or overrides; remove them")
        if self.join_timeout_s <= 0 or self.doctor_size_MB < 1:
            raise UserError("--join-timeout must be > 0 and --size-MB >= 1")
        if target == "k8s" and not self.image:
            raise UserError("--image is required for --target k8s (the container image that has gonogo installed)")
        self.check_strings()

    def check_strings(self) -> None:
        """Every user string that lands in the generated files: names that are written unquoted
        (``#SBATCH`` lines, Kubernetes names, variable names) may hold only what their place
        allows; everything else is quoted with shlex, and no field may hold a newline."""
        check_dns_label(self.name, "--name")
        check_dns_label(self.namespace, "--namespace")
        check_pattern(self.pvc, r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", "--pvc",
                      "a Kubernetes name: lower-case letters, digits, '-' and '.'")
        check_pattern(self.shared_dir, r"/[A-Za-z0-9_./-]*", "--shared-dir",
                      "an absolute path of letters, digits, '_', '-', '.' and '/' (it is written into #SBATCH lines)")
        if ".." in self.shared_dir.split("/"):
            raise UserError(f"--shared-dir {self.shared_dir!r} must not contain '..'; give the real path")
        check_pattern(self.partition, r"[A-Za-z0-9_.,-]*", "--partition", "letters, digits, '_', '-', '.' and ','")
        check_pattern(self.account, r"[A-Za-z0-9_.-]*", "--account", "letters, digits, '_', '-' and '.'")
        check_pattern(self.time_limit, r"[0-9]+(-[0-9]+)?(:[0-9]+){0,2}", "--time",
                      "a Slurm time such as 04:00:00, 90 or 1-12:00:00")
        check_pattern(self.memory, r"[0-9]+(\.[0-9]+)?([KMGTPE]i?)?", "memory", "a Kubernetes quantity such as 512Gi")
        for what, value in (("config", self.config), ("--image", self.image),
                            *(("override", item) for item in self.overrides)):
            check_single_line(value, what)
        for key, value in self.env.items():
            check_env_name(key, "--env")
            check_single_line(value, f"--env {key}")

    @property
    def run_dir(self) -> str:
        return f"{self.shared_dir}/runs/{self.name}"

    def environment(self) -> dict[str, str]:
        return {**DEFAULT_NCCL_ENV, **self.env}

    def train_command(self, node_rank: str, endpoint: str, rdzv_id: str) -> str:
        """The command every node runs (shell words; the three arguments may be shell expressions)."""
        words = ["gonogo", "train", shlex.quote(self.config), "--nproc", str(self.gpus_per_node),
                 "--nnodes", str(self.nodes), "--node-rank", node_rank, "--rdzv-endpoint", endpoint,
                 "--rdzv-id", rdzv_id, "--max-restarts", str(self.max_restarts),
                 "--out", shlex.quote(self.run_dir), "--resume", "auto"]
        words += [shlex.quote(item) for item in self.overrides]
        return " ".join(words)

    def node_command(self, node_rank: str, endpoint: str, rdzv_id: str) -> str:
        """What every node runs: the training job, or the doctor of many nodes."""
        if self.job == "train":
            return self.train_command(node_rank, endpoint, rdzv_id)
        return " ".join(["gonogo", "doctor", "--nnodes", str(self.nodes), "--node-rank", node_rank,
                         "--rdzv-endpoint", endpoint, "--join-timeout", f"{self.join_timeout_s:g}",
                         "--path", shlex.quote(self.shared_dir), "--size-MB", str(self.doctor_size_MB)])


def slurm_script(spec: LaunchSpec) -> str:
    env_lines = "\n".join(f"export {key}={shlex.quote(value)}" for key, value in spec.environment().items())
    optional = ""
    if spec.partition:
        optional += f"#SBATCH --partition={spec.partition}\n"
    if spec.account:
        optional += f"#SBATCH --account={spec.account}\n"
    # expanded by each node's own shell: SLURM_NODEID differs per node
    command = spec.node_command('"$SLURM_NODEID"', '"$HEAD_NODE:$RDZV_PORT"', '"$SLURM_JOB_ID"')
    node_command = shlex.quote(f'cd "$SLURM_SUBMIT_DIR" && {command}')
    non_recoverable = " ".join(str(code) for code in NON_RECOVERABLE_EXITS)
    return f"""#!/bin/bash
# Written by `gonogo launch --target slurm --job {spec.job}`: {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s), one {"torchrun agent" if spec.job == "train" else "doctor"} per node.
#SBATCH --job-name={spec.name}
#SBATCH --nodes={spec.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={spec.gpus_per_node}
#SBATCH --cpus-per-task={spec.cpus_per_node}
#SBATCH --time={spec.time_limit}
{"#SBATCH --requeue" if spec.job == "train" else "#SBATCH --no-requeue"}
#SBATCH --open-mode=append
#SBATCH --output={spec.shared_dir}/logs/%x-%j.out
{optional}set -uo pipefail

{env_lines}
export RDZV_PORT=${{RDZV_PORT:-{RDZV_PORT}}}
mkdir -p {shlex.quote(spec.shared_dir)}/logs {shlex.quote(spec.shared_dir)}/runs

# the rendezvous endpoint is the first node of the allocation
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export HEAD_NODE
echo "gonogo: job $SLURM_JOB_ID on $SLURM_NNODES node(s), rendezvous at $HEAD_NODE:$RDZV_PORT, restart ${{SLURM_RESTART_COUNT:-0}}"

srun --kill-on-bad-exit=1 --nodes={spec.nodes} --ntasks-per-node=1 bash -c {node_command}
code=$?

if [ "$code" -eq 0 ]; then
  exit 0
fi
for fatal in {non_recoverable}; do
  if [ "$code" -eq "$fatal" ]; then
    echo "gonogo: exit code $code is a configuration error; not requeueing (exit {DO_NOT_REQUEUE_EXIT})" >&2
    exit {DO_NOT_REQUEUE_EXIT}
  fi
done
if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {spec.retries} ]; then
  echo "gonogo: exit code $code; requeueing to resume from the newest committed checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
"""


def _container(spec: LaunchSpec, command: str) -> dict[str, Any]:
    return {
        "name": "trainer",
        "image": spec.image,
        "command": ["bash", "-c", command],
        "env": [{"name": key, "value": value} for key, value in spec.environment().items()],
        "resources": {
            "limits": {"nvidia.com/gpu": spec.gpus_per_node, "cpu": spec.cpus_per_node, "memory": spec.memory},
            "requests": {"nvidia.com/gpu": spec.gpus_per_node, "cpu": spec.cpus_per_node, "memory": spec.memory},
        },
        "volumeMounts": [{"name": "shared", "mountPath": spec.shared_dir}, {"name": "dshm", "mountPath": "/dev/shm"}],
        "ports": [{"containerPort": RDZV_PORT, "name": "rdzv"}],
    }


def _volumes(spec: LaunchSpec) -> list[dict[str, Any]]:
    return [{"name": "shared", "persistentVolumeClaim": {"claimName": spec.pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def pytorchjob(spec: LaunchSpec) -> dict[str, Any]:
    """A Kubeflow training-operator PyTorchJob: one Master and nodes-1 Workers, one pod per node."""
    # the operator sets MASTER_ADDR, MASTER_PORT and RANK (the pod's node rank) in every pod
    command = spec.node_command('"$RANK"', '"$MASTER_ADDR:$MASTER_PORT"', f"{spec.name}")

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure" if spec.retries else "Never",
            "template": {"spec": {"containers": [_container(spec, command)], "volumes": _volumes(spec)}},
        }

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/managed-by": "gonogo"}},
        "spec": {"runPolicy": {"backoffLimit": spec.retries, "cleanPodPolicy": "Running"},
                 "pytorchReplicaSpecs": replicas},
    }


def indexed_job(spec: LaunchSpec) -> list[dict[str, Any]]:
    """The plain batch/v1 Job form: an Indexed Job (one pod per node) and its headless Service."""
    service = f"{spec.name}-rdzv"
    endpoint = f"{spec.name}-0.{service}:{RDZV_PORT}"
    command = spec.node_command('"$JOB_COMPLETION_INDEX"', endpoint, spec.name)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/managed-by": "gonogo"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            "backoffLimit": spec.retries,
            # exit code 2 is a configuration error: fail the job instead of retrying it
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                      "values": list(NON_RECOVERABLE_EXITS)}},
            ]},
            "template": {
                "metadata": {"labels": {"job-name": spec.name}},
                "spec": {
                    "subdomain": service,
                    "restartPolicy": "Never",
                    "containers": [_container(spec, command)],
                    "volumes": _volumes(spec),
                },
            },
        },
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "namespace": spec.namespace},
        "spec": {"clusterIP": "None", "selector": {"job-name": spec.name},
                 "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }
    return [headless, job]


def write_launch_files(target: str, spec: LaunchSpec, out: Path) -> list[Path]:
    import yaml

    from gonogo.files import check_output_dir, write_atomic

    spec.validate(target)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if target == "slurm":
        path = out / f"{spec.name}.sbatch"
        write_atomic(path, slurm_script(spec))
        path.chmod(0o755)
        written.append(path)
    else:
        path = out / f"{spec.name}.pytorchjob.yaml"
        write_atomic(path, yaml.safe_dump(pytorchjob(spec), sort_keys=False))
        written.append(path)
        path = out / f"{spec.name}.job.yaml"
        write_atomic(path, yaml.safe_dump_all(indexed_job(spec), sort_keys=False))
        written.append(path)
    return written


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r} is not KEY=VALUE")
        result[key] = value
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, choices=["slurm", "k8s"], help="what to write")
    parser.add_argument("--job", choices=["train", "doctor"], default="train",
                        help="train (default), or doctor: the inventory of many nodes (`gonogo doctor --nnodes N`)")
    parser.add_argument("config", nargs="?", default="",
                        help="the training preset or TOML config (as `gonogo train` takes it; none with --job doctor)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed on to `gonogo train`")
    parser.add_argument("--nodes", type=int, help="number of nodes (required)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (required)")
    parser.add_argument("--image", default="", help="container image with gonogo installed (required for k8s)")
    parser.add_argument("--name", default=None, help="job name (default: gonogo-train, or gonogo-doctor)")
    parser.add_argument("--shared-dir", default="/shared/gonogo", help="shared storage for runs and checkpoints")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--pvc", default="gonogo-shared", help="PersistentVolumeClaim mounted at --shared-dir (k8s)")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--time", dest="time_limit", default="04:00:00", help="Slurm time limit")
    parser.add_argument("--max-restarts", type=int, default=3, help="requeues / pod retries before giving up")
    parser.add_argument("--env", action="append", default=[], help="extra environment KEY=VALUE (repeatable)")
    parser.add_argument("--join-timeout", type=float, default=300.0,
                        help="--job doctor: seconds node 0 waits for every node (default: 300)")
    parser.add_argument("--size-MB", dest="size_MB", type=int, default=256,
                        help="--job doctor: MB written and read back in the storage probe of --shared-dir")
    parser.add_argument("--out", type=Path, default=Path("launch"), help="folder for the generated files")


def command(args: argparse.Namespace) -> int:
    from rich.console import Console

    missing = [flag for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)) if value is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                        f"(for example: --nodes 2 --gpus-per-node 8)")
    spec = LaunchSpec(config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      name=args.name or ("gonogo-doctor" if args.job == "doctor" else "gonogo-train"),
                      shared_dir=args.shared_dir.rstrip("/"), overrides=list(args.overrides),
                      env=_key_values(args.env, "--env"), image=args.image, namespace=args.namespace, pvc=args.pvc,
                      partition=args.partition, account=args.account, time_limit=args.time_limit,
                      max_restarts=args.max_restarts, job=args.job, join_timeout_s=args.join_timeout,
                      doctor_size_MB=args.size_MB)
    for path in write_launch_files(args.target, spec, args.out):
        Console().print(f"wrote {path}")
    return 0
