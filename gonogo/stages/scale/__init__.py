"""Stage kind ``scale``: the same training job at several process counts."""
