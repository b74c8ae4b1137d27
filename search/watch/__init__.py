"""Watching a run: its status, and the trackers it reports to."""
