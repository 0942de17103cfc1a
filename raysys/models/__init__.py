"""Torch model code shared by the raysys systems."""
