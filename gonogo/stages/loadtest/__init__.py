"""Stage kind ``loadtest``: a load test of an OpenAI-compatible server."""
