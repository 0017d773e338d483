"""Stage kind ``serve``: an OpenAI-compatible server (the server: gonogo.infer)."""
