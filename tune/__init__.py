"""Ray Tune entry points: `python -m tune` (search) and `python -m tune.compare` (results table)."""
