"""Ray-free records of what lands on disk: run folders, checkpoints, searches and the sources `python -m train --from` reads."""
