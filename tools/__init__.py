"""Builders of the tiny demo world and base (recipes/tiny), run from the repository root as `python -m tools.NAME`."""
