"""Checkpoints: what a model on disk is, how it is verified once, loaded, and saved by training.

- ``manifest``: the on-disk contract (names, durable writes, XXH3-128 manifest, verification).
- ``reference``: ``resolve(path) -> CheckpointRef`` (format, metadata, verified manifest), hashed
  once per process (``STATS`` counts verifications).
- ``loaders``: one loader per format (gonogo, quantized, Hugging Face) in ``LOADERS``;
  ``load_for_inference`` takes a reference without verifying it again.
- ``hf``: the Hugging Face format's read side (``gonogo.export.hf`` writes it).
- ``writers``: safetensors and DCP files hashed while they are written.
- ``checkpointer``: the training side (``Checkpointer``: DCP save, async save, resume, retention).
- ``adapters``: LoRA weights in a checkpoint (merge for the consolidated weights).

Nothing here imports a stage module; importing the package (and resolving) does not import torch.
"""

from gonogo.checkpoints.reference import (
    STATS,
    CheckpointRef,
    check_readable,
    check_resume_path,
    resolve,
)

__all__ = ["STATS", "CheckpointRef", "check_readable", "check_resume_path", "resolve"]
