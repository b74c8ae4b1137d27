"""The run directory and its journal: what a search writes, and how it is read back."""
