"""Checkpoint I/O: safetensors reading and writing, model files, the hub, the sources."""
