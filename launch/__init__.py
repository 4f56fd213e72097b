"""Launchers that start the ranks of a run (torchrun on one or more nodes)."""
