"""Stage kind ``quantize``: FP8 / NVFP4 quantization (the format: gonogo.checkpoints.quantized)."""
