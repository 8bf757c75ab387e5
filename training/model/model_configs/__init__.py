"""Registered model configs (open_clip JSON layout); a package so that wheels ship the JSON files."""
