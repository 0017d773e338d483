"""Stage kind ``capacity``: capacity planning at scale (the planner: gonogo.capacity)."""
