"""Stage kind ``canary``: a staged canary rollout (the controller and router: gonogo.rollout)."""
