"""Fault drills: inject a fault into a short training, check it is detected and recovered."""
