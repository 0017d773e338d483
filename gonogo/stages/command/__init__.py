"""Stage kind ``command``: any program as a stage (see stage.py)."""
