"""Stage kind ``drill``: fault drills beside a fault-free twin (the drills themselves: gonogo.drills)."""
