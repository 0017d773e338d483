"""gonogo: prove an LLM training and serving stack end to end, with a go/no-go gate per stage."""

__version__ = "0.1.0"
