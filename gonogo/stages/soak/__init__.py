"""Stage kind ``soak``: training held for a wall-clock window."""
