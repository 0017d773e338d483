"""The torchrun entry of ``gonogo collectives``: times and checks each collective on every rank.

    python -m torch.distributed.run --nproc-per-node=N -m gonogo.cluster.collectives_worker \
        --min-bytes 1024 --max-bytes 16777216 --factor 4 --ops all_reduce,... --results F

Every rank runs the same loop (op, then dtype, then size, then out-of-place and in-place form);
rank 0 prints the nccl-tests-style table as it goes and writes every row to ``--results``.
The arithmetic (what is sent, what S is, the bus bandwidth factor) follows nccl-tests
(src/*.cu: *GetCollByteCount, *GetBw); see docs/collectives.md.

Fault injection for tests and drills (environment variables, read by every rank):
  GONOGO_INJECT_WRONG=<rank>  that rank adds 1 to the first output element of every checked
                              collective, so ``#wrong`` must show it.
  GONOGO_INJECT_HANG=<rank>   that rank sleeps forever before the first collective.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from gonogo.cluster import collectives_table as table
from gonogo.rundir import write_json_atomic

# ops whose S is the whole gathered / scattered / exchanged array (count per rank × n)
WHOLE_ARRAY_OPS = {"all_gather", "reduce_scatter", "all_to_all"}
BUS_FACTORS: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "sendrecv": lambda n: 1.0,
}
# which forms torch has for each op (see the module docs of gonogo.stages.collectives.stage)
FORMS: dict[str, tuple[bool, bool]] = {  # op -> (out-of-place, in-place)
    "all_reduce": (False, True),
    "all_gather": (True, True),
    "reduce_scatter": (True, True),
    "all_to_all": (True, False),
    "broadcast": (False, True),
    "sendrecv": (True, False),
}
REDOPS = {"all_reduce": "sum", "reduce_scatter": "sum", "sendrecv": "sum"}  # else "none"
BROADCAST_ROOT = 0


def collective_counts(op: str, count: int, element_size: int, world: int) -> tuple[int, int, int]:
    """(send count, receive count, count per call) for ``count`` elements, as nccl-tests sizes them.

    Gather/scatter/all-to-all split the size across ranks, rounded down to 16 bytes per rank.
    """
    if op in WHOLE_ARRAY_OPS:
        per_rank = (count // world) & ~(16 // element_size - 1)
        if op == "all_gather":
            return per_rank, per_rank * world, per_rank
        if op == "reduce_scatter":
            return per_rank * world, per_rank, per_rank
        return per_rank * world, per_rank * world, per_rank
    return count, count, count


def bandwidths(op: str, param_count: int, element_size: int, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (10^9 bytes), nccl-tests' definitions."""
    size = param_count * element_size * (world if op in WHOLE_ARRAY_OPS else 1)
    algbw = size / 1.0e9 / seconds if seconds > 0 else 0.0
    return algbw, algbw * BUS_FACTORS[op](world)


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    result, size = [], min_bytes
    while size <= max_bytes:
        result.append(size)
        size *= factor
    return result


def injected_rank(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


# every integer up to this is exact in the dtype: 2 ** (significand bits + 1)
EXACT_INTEGERS = {"float32": 2 ** 24, "bfloat16": 2 ** 8}


def value_bounds(world: int, exact: int) -> tuple[int, int]:
    """(largest input value, spacing of the ranks that add to one element) such that a sum of
    ``world`` ranks' inputs never exceeds ``exact``: values up to 7 while 7 x world fits, then
    0/1 inputs from every ``stride``-th rank only (at most exact / 1 of them per element)."""
    max_value = max(1, min(7, exact // world))
    stride = -(-world * max_value // exact)
    return max_value, stride


class Benchmark:
    """One rank's view of the run: buffers, timing, checking."""

    def __init__(self, args: argparse.Namespace):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.args = torch, dist, args
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # NCCL needs a GPU per process; with fewer GPUs than processes every rank of the machine
        # falls back to gloo on CPU (the same decision on every rank) and the header says so
        self.cuda = gpus >= local_world
        self.note = (f"{local_world} processes but {gpus} GPU(s) on this machine: measured gloo on CPU"
                     if 0 < gpus < local_world else None)
        self.device = torch.device("cuda", local_rank) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.backend = "nccl" if self.cuda else "gloo"
        self.timeout = timedelta(seconds=args.collective_timeout)
        dist.init_process_group(self.backend, timeout=self.timeout,
                                device_id=self.device if self.cuda else None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # monitored_barrier (gloo only) names the rank that does not arrive; NCCL runs get a
        # gloo side group for it and for the small bookkeeping exchanges
        self.control = dist.group.WORLD if self.backend == "gloo" else dist.new_group(backend="gloo", timeout=self.timeout)
        self.inject_wrong = injected_rank("GONOGO_INJECT_WRONG")
        self.set_value_bounds(args.dtypes)
        self.where = "start-up"

    def set_value_bounds(self, dtype_names: list[str]) -> None:
        """Input values whose sums over all ranks stay exact integers in every dtype of the run."""
        exact = min(EXACT_INTEGERS[name] for name in dtype_names)
        self.max_value, self.stride = value_bounds(self.world, exact)

    # -- data -------------------------------------------------------------------------------
    def pattern(self, start: int, length: int, rank: int, rep: int, summed: bool = False):
        """Small integers that depend on the element index, the rank and the check repetition.

        ``summed``: the input of a reduction. Then only every ``stride``-th rank contributes to an
        element (which ranks depends on the element), so that at any scale no sum, and no partial
        sum on the way, leaves the integers the dtype holds exactly.
        """
        index = self.torch.arange(start, start + length, dtype=self.torch.int64, device=self.device)
        mixed = index * 7 + rank * 3 + rep
        if summed and self.stride > 1:
            # 1 .. max_value where this rank contributes (never 0 there: a sum of zeros checks nothing)
            return (1 + mixed % self.max_value) * ((index + rank + rep) % self.stride == 0)
        return mixed % (self.max_value + 1)

    def expected(self, op: str, counts: tuple[int, int, int], rep: int):
        """The exact result every rank must hold after ``op`` on the pattern inputs (int64)."""
        _, receive_count, per_rank = counts
        rank, world = self.rank, self.world
        if op == "all_reduce":
            return sum(self.pattern(0, receive_count, q, rep, summed=True) for q in range(world))
        if op == "reduce_scatter":
            return sum(self.pattern(rank * per_rank, per_rank, q, rep, summed=True) for q in range(world))
        if op == "all_gather":
            return self.torch.cat([self.pattern(q * per_rank, per_rank, q, rep) for q in range(world)])
        if op == "all_to_all":
            return self.torch.cat([self.pattern(rank * per_rank, per_rank, q, rep) for q in range(world)])
        if op == "broadcast":
            return self.pattern(0, receive_count, BROADCAST_ROOT, rep)
        assert op == "sendrecv", op
        return self.pattern(0, receive_count, (rank - 1) % world, rep)

    def input_values(self, op: str, counts: tuple[int, int, int], rep: int):
        send_count, _, per_rank = counts
        if op == "all_gather":
            return self.pattern(self.rank * per_rank, per_rank, self.rank, rep)
        if op == "broadcast" and self.rank != BROADCAST_ROOT:
            return self.torch.zeros(send_count, dtype=self.torch.int64, device=self.device)
        return self.pattern(0, send_count, self.rank, rep, summed=op in ("all_reduce", "reduce_scatter"))

    # -- one op in one form -----------------------------------------------------------------
    def prepare(self, op: str, in_place: bool, counts: tuple[int, int, int], dtype):
        """(send view, receive view, launch) for one op and form; views alias in the in-place form."""
        torch, dist = self.torch, self.dist
        send_count, receive_count, per_rank = counts
        new = lambda n: torch.zeros(n, dtype=dtype, device=self.device)  # noqa: E731
        if op == "all_reduce":
            send = receive = new(receive_count)
            return send, receive, lambda: dist.all_reduce(receive)
        if op == "broadcast":
            send = receive = new(receive_count)
            return send, receive, lambda: dist.broadcast(receive, src=BROADCAST_ROOT)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        if op == "all_gather":
            receive = new(receive_count)
            # in place, as nccl-tests does: this rank's input is its own slice of the output
            send = receive[self.rank * per_rank:(self.rank + 1) * per_rank] if in_place else new(send_count)
            return send, receive, lambda: gather(receive, send)
        if op == "reduce_scatter":
            send = new(send_count)
            receive = send[self.rank * per_rank:(self.rank + 1) * per_rank] if in_place else new(receive_count)
            return send, receive, lambda: scatter(receive, send)
        if op == "all_to_all":
            send, receive = new(send_count), new(receive_count)
            return send, receive, lambda: dist.all_to_all_single(receive, send)
        assert op == "sendrecv", op
        send, receive = new(send_count), new(receive_count)
        peers = ((self.rank + 1) % self.world, (self.rank - 1) % self.world)

        def ring_step() -> None:
            operations = [dist.P2POp(dist.isend, send, peers[0]), dist.P2POp(dist.irecv, receive, peers[1])]
            for work in dist.batch_isend_irecv(operations):
                work.wait()
        return send, receive, ring_step

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def measure(self, op: str, in_place: bool, counts: tuple[int, int, int], dtype, element_size: int) -> dict[str, Any]:
        torch, dist, args = self.torch, self.dist, self.args
        send, receive, launch = self.prepare(op, in_place, counts, dtype)
        send.copy_(self.input_values(op, counts, rep=99))
        for _ in range(args.warmup):
            launch()
        self.synchronize()
        dist.barrier(group=self.control)
        start = time.perf_counter()
        for _ in range(args.iters):
            launch()
        self.synchronize()
        seconds = (time.perf_counter() - start) / args.iters
        # the reported time is the mean over ranks, as nccl-tests' default (-a 1)
        total = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        seconds = total.item() / self.world
        algbw, busbw = bandwidths(op, counts[2], element_size, seconds, self.world)
        wrong: Optional[int] = None
        if args.check > 0:
            wrong = 0
            for rep in range(args.check):
                receive.zero_()
                send.copy_(self.input_values(op, counts, rep))
                launch()
                self.synchronize()
                if self.inject_wrong == self.rank and receive.numel() > 0:
                    receive.view(-1)[0] += 1
                mismatches = (receive.to(torch.float64) != self.expected(op, counts, rep).to(torch.float64)).sum()
                mismatches = mismatches.to(torch.int64).reshape(1)
                dist.all_reduce(mismatches)
                wrong = int(mismatches.item())
                if wrong:
                    break  # as nccl-tests: the first failing repetition is reported
        return {"time": seconds * 1e6, "alg_bw": algbw, "bus_bw": busbw, "nwrong": wrong}

    # -- the whole run ----------------------------------------------------------------------
    def arrive(self, what: str) -> None:
        """Wait for every rank before ``what``; a rank that never comes is named in the error."""
        self.where = what
        self.dist.monitored_barrier(group=self.control, timeout=self.timeout, wait_all_ranks=True)

    def describe_ranks(self) -> list[dict[str, Any]]:
        torch = self.torch
        name = torch.cuda.get_device_name(self.device) if self.cuda else (_cpu_name() or "cpu")
        mine = {"rank": self.rank, "pid": os.getpid(), "hostname": socket.gethostname(),
                "device": self.device.index or 0, "device_info": name}
        everyone: list[Any] = [None] * self.world
        self.dist.all_gather_object(everyone, mine, group=self.control)
        return everyone

    def run(self) -> dict[str, Any]:
        torch, args = self.torch, self.args
        devices = self.describe_ranks()
        config = {
            "nranks": self.world, "backend": self.backend, "device": self.device.type,
            "torch": torch.__version__, "minimum_bytes": args.min_bytes, "maximum_bytes": args.max_bytes,
            "step_factor": args.factor, "warmup_iters": args.warmup, "iterations": args.iters,
            "validation": args.check, "ops": args.ops, "dtypes": args.dtypes, "note": self.note,
        }
        if self.rank == 0:
            emit(table.header_lines(config, devices))
        hang = injected_rank("GONOGO_INJECT_HANG")
        if hang == self.rank:
            while True:  # a deliberately hung rank: only a signal ends it
                time.sleep(60)
        rows: list[dict[str, Any]] = []
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        for op in args.ops:
            if self.rank == 0:
                emit(table.op_header_lines(op))
            out_of_place, in_place = FORMS[op]
            for dtype_name in args.dtypes:
                dtype = dtypes[dtype_name]
                element_size = torch.empty((), dtype=dtype).element_size()
                for size in sizes(args.min_bytes, args.max_bytes, args.factor):
                    counts = collective_counts(op, size // element_size, element_size, self.world)
                    self.arrive(f"{op} {dtype_name} {size} B")
                    row = {
                        "op": op, "size": max(counts[0], counts[1]) * element_size, "count": counts[2],
                        "type": table.NCCL_TYPE_NAMES[dtype_name], "redop": REDOPS.get(op, "none"),
                        "root": BROADCAST_ROOT if op == "broadcast" else -1,
                        "out_of_place": self.measure(op, False, counts, dtype, element_size) if out_of_place else None,
                        "in_place": self.measure(op, True, counts, dtype, element_size) if in_place else None,
                    }
                    rows.append(row)
                    if self.rank == 0:
                        emit([table.row_line(row)])
        summary = table.summarize(rows)
        if self.rank == 0:
            emit(table.footer_lines(summary))
        self.where = "shut-down"
        return {"config": config, "devices": devices, "results": rows, **summary}


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def emit(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def explain(error: BaseException, timeout_s: float) -> str:
    """One line that says what went wrong, in words a user can act on."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(error))
    if missing:
        return f"rank(s) {missing.group(1).strip()} did not arrive within {timeout_s:g} s (hung or dead)"
    if re.search(r"Connection (reset|closed) by peer|Broken pipe|Connection refused", text):
        return "lost the connection to another rank (did it die?)"
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return f"timed out after {timeout_s:g} s waiting for another rank (hung or dead?): {text[:200]}"
    return text[:300]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gonogo.cluster.collectives_worker")
    parser.add_argument("--min-bytes", type=int, required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--factor", type=int, required=True)
    parser.add_argument("--ops", type=lambda text: text.split(","), required=True)
    parser.add_argument("--dtypes", type=lambda text: text.split(","), required=True)
    parser.add_argument("--iters", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--check", type=int, required=True)
    parser.add_argument("--collective-timeout", type=float, required=True)
    parser.add_argument("--results", required=True, help="JSON file rank 0 writes every row to")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    benchmark: Optional[Benchmark] = None
    try:
        benchmark = Benchmark(args)
        results = benchmark.run()
        if benchmark.rank == 0:
            write_json_atomic(Path(args.results), results)
        from gonogo.parallel import leave_together

        # as the trainer's workers: every rank leaves the last collective before any tears its pairs down
        benchmark.where = "leaving"
        benchmark.dist.barrier(group=benchmark.control)
        leave_together(benchmark.dist, benchmark.world)
        benchmark.dist.destroy_process_group()
        return 0
    except Exception as error:  # any failure ends this rank with one clear line for the parent
        rank = benchmark.rank if benchmark else os.environ.get("RANK", "?")
        where = benchmark.where if benchmark else "start-up"
        emit([f"# error: rank {rank}: {where}: {explain(error, args.collective_timeout)}"])
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
