"""Data only: the CLIP paper's prompt templates and class names (read by `evaluation.templates`).

A package (rather than a plain folder) so that the `*.txt` files ship in the wheel with the
project's package-data rule.
"""
