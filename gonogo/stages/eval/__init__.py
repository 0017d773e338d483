"""Stage kind ``eval``: reasoning evaluation (the scoring and sampling: gonogo.eval)."""
