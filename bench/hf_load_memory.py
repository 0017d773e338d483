"""Peak resident memory of importing a sharded Hugging Face checkpoint, against its size on disk.

    python bench/hf_load_memory.py [--dir /tmp/hf-llama] [--dtype bfloat16]

Makes (once) a random Llama of about 170M parameters saved by transformers in 100 MB shards,
then, in a fresh process, measures the resident set before the import (torch imported) and its
peak during ``gonogo.checkpoints.hf_import.load_hf_dir`` (ru_maxrss). The ratio peak-growth / bytes on disk
is what docs/models.md quotes; a loader that held a second full copy would show ~2x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def make(directory: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(directory, max_shard_size="100MB")


def measure(directory: Path) -> dict:
    import torch  # noqa: F401  (the baseline includes torch, as any gonogo command does)

    from gonogo.typed_config import validate  # noqa: F401  (and the modules the import uses: a constant
    from gonogo.checkpoints.hf_import import load_hf_dir  # ~70 MB that is no copy of the weights)
    from gonogo.model.shape import ModelConfig  # noqa: F401
    from gonogo.model.decoder import Decoder  # noqa: F401

    def rss_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    before = rss_kib()
    model, _config, meta = load_hf_dir(directory)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    on_disk = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"shards": len(list(directory.glob("*.safetensors"))), "bytes_on_disk": on_disk, "model_bytes": params,
            "dtype": meta["source"]["dtype"], "rss_before_kib": before, "peak_rss_kib": peak,
            "peak_growth_over_disk": round((peak - before) * 1024 / on_disk, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hf-llama-170m"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir)))
        return
    if not (args.dir / "config.json").is_file():
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import hf_load_memory as m; from pathlib import Path; m.make(Path({str(args.dir)!r}), {args.dtype!r})"],
                       check=True)
    result = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--measure"], check=True,
                            capture_output=True, text=True)
    print(result.stdout.strip())


if __name__ == "__main__":
    main()
