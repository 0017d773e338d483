"""Stage kind ``train``: distributed pretraining (the training itself: gonogo.train)."""
