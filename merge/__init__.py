"""Merge engine: recipes, merge methods, architectures and streaming safetensors I/O.

Depends on no other evomerge package, nor on Ray or lm-eval.
"""
