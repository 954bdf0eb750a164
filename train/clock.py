"""The workers' clock: training steps, validations and the time between progress lines are
timed with `now`, which tests replace with a fake clock to check the time budget and the
progress cadence without sleeping."""

from __future__ import annotations

import time

now = time.perf_counter
