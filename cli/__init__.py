"""Thin typer front ends: ``samcache`` (stage 1) and ``slca-train`` (stage 2)."""
