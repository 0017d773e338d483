"""Stage kind ``doctor``: inventory and health."""
