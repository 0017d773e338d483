"""Stage kind ``memory``: the largest micro-batch that fits (the probe: gonogo.train.memory_probe)."""
