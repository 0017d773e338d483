"""Stage kind ``collectives``: an nccl-tests-style collectives benchmark."""
