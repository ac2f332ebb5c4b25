"""Verifier-driven inference-time scaling: repeated and sequential sampling on checkable tasks."""
