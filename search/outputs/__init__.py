"""What a run yields: the exported recipe and model, the report."""
