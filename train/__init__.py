"""Ray Train entry points: `python -m train` (training) and `python -m train.predict`."""
