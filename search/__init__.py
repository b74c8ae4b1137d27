"""Search: genome, CMA-ES optimizer, run directory and journal, Ray workers, the CLI."""
