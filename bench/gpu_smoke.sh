#!/usr/bin/env bash
# Install gonogo on a fresh GPU machine, run the one-GPU plan, keep what it found.
#
#   bash bench/gpu_smoke.sh [DEST]        (from the repository root or anywhere)
#
# DEST (default: "$OUT/gpu-smoke" when OUT is set, else ./gpu-smoke-result) receives the run
# directory without its files over 4 MB (checkpoints, weights: listed in left-out.txt; the
# report, summary, metrics and events always come), and the
# machine's description: nvidia-smi, torch and driver versions, pip freeze, the console log.
# Exit status: gonogo's (0 GO, 1 NO-GO, 2 error), 124 when the timeout ended the run, 3 when the
# machine cannot run it (no CUDA torch).
#
# Time: the plan aims at under 8 minutes on an H100/H200. GPU_SMOKE_TIMEOUT_S (default 420 s)
# bounds the run so that, of 15 minutes of device time with a few spent starting the machine,
# one rerun still fits: GPU_SMOKE_RESUME=1 reruns into the same work directory with --resume,
# so the stages that passed are not run again.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${OUT:-}" ]]; then
    DEFAULT_DEST="$OUT/gpu-smoke"
else
    DEFAULT_DEST="$PWD/gpu-smoke-result"
fi
DEST="$(mkdir -p "${1:-$DEFAULT_DEST}" && cd "${1:-$DEFAULT_DEST}" && pwd)"
WORK="${GPU_SMOKE_WORK:-$REPO/runs/gpu-smoke-work}"
TIMEOUT_S="${GPU_SMOKE_TIMEOUT_S:-420}"
MAX_COPY_BYTES="${GPU_SMOKE_MAX_COPY_BYTES:-4000000}"   # larger files stay behind (checkpoints)
PYTHON="${PYTHON:-python3}"
LOG="$DEST/console.log"
: > "$LOG"

say() { echo "gpu-smoke: $*" | tee -a "$LOG" >&2; }

cd "$REPO" || exit 3
say "repository $REPO, results to $DEST, timeout ${TIMEOUT_S}s"
{ date -u; uname -a; nvidia-smi 2>&1; nvidia-smi -q 2>&1 | head -200; } > "$DEST/machine.txt"

# 1. a CUDA torch: the one the machine has. pyproject accepts an existing torch >= 2.6, so
#    `pip install -e .` keeps it; only a machine without torch gets PyPI's default (CUDA) build.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    say "no torch here: installing PyPI's torch (a CUDA build on Linux x86-64)"
    "$PYTHON" -m pip install "torch>=2.6,<=2.13.0" >> "$LOG" 2>&1 || { say "cannot install torch"; exit 3; }
fi
"$PYTHON" - > "$DEST/torch.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(i, p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
EOF
cat "$DEST/torch.txt" | tee -a "$LOG" >&2
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "torch sees no CUDA GPU on this machine: nothing to smoke-test"
    exit 3
fi

# 2. gonogo itself, editable. Offline machines: without build isolation, then without the
#    dependencies pip cannot fetch (whatever is missing is named below).
if ! "$PYTHON" -m pip install -e ".[test]" >> "$LOG" 2>&1; then
    say "pip install -e . failed (offline?); trying without build isolation / dependencies"
    "$PYTHON" -m pip install --no-build-isolation -e . >> "$LOG" 2>&1 \
        || "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1 \
        || say "no editable install: running from the source tree (PYTHONPATH)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - >> "$LOG" 2>&1 <<'EOF'
import importlib
missing = [name for name in ("pydantic", "fastapi", "uvicorn", "httpx", "openai", "safetensors", "pynvml",
                             "matplotlib", "jinja2", "rich", "prometheus_client")
           if importlib.util.find_spec(name) is None]
print("missing python packages:", ", ".join(missing) if missing else "none")
EOF
"$PYTHON" -m pip freeze > "$DEST/pip-freeze.txt" 2>/dev/null

# 3. the plan, bounded; a rerun resumes the same work directory
if [[ "${GPU_SMOKE_RESUME:-0}" == "1" && -d "$WORK" ]]; then
    say "resuming $WORK"
    ARGS=(run --resume --out "$WORK")
else
    rm -rf "$WORK"
    ARGS=(run gpu-smoke --out "$WORK")
fi
started=$(date +%s)
timeout --signal=TERM --kill-after=20 "$TIMEOUT_S" "$PYTHON" -m gonogo "${ARGS[@]}" 2>&1 | tee -a "$LOG"
code=${PIPESTATUS[0]}
say "gonogo exited $code after $(( $(date +%s) - started )) s"

# 4. the run directory, without its large binaries
"$PYTHON" - "$WORK" "$DEST/run" "$MAX_COPY_BYTES" >> "$LOG" 2>&1 <<'EOF'
import os, shutil, sys
source, target, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
left = []
if os.path.isdir(source):
    shutil.rmtree(target, ignore_errors=True)
    for root, _dirs, files in os.walk(source):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, source)
            size = os.path.getsize(path) if not os.path.islink(path) else 0
            always = name in ("report.html", "summary.json", "events.jsonl", "metrics.json")
            if os.path.islink(path) or (size > limit and not always):
                left.append(f"{relative}\t{size}")
                continue
            os.makedirs(os.path.join(target, os.path.dirname(relative)), exist_ok=True)
            shutil.copy2(path, os.path.join(target, relative))
    with open(os.path.join(os.path.dirname(target), "left-out.txt"), "w") as out:
        out.write("\n".join(left) + "\n")
print(f"copied {source} -> {target}; {len(left)} large file(s) left behind (left-out.txt)")
EOF
say "results in $DEST (report: $DEST/run/report.html, verdict: $DEST/run/summary.json)"
exit "$code"
