"""Reasoning evaluation: generation with the inference engine, pass@k / maj@k / best-of-N, the eval stage."""
