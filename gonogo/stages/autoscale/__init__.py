"""Stage kind ``autoscale``: a replica pool behind a router with an autoscaler."""
