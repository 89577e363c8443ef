import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Small networks train fastest on one thread, and the suite must not oversubscribe CI's
# two cores when tests run next to each other.
torch.set_num_threads(1)

os.environ.setdefault("WANDB_SILENT", "true")

# Hypothesis profiles for the property tests, which take their example counts from here (a
# test may only ask for a fraction of the profile's). "default" (`make test` by hand): 50
# random examples per property, new ones each run; the local database (.hypothesis/) replays
# failures first. "ci" (`.ci/run` exports HYPOTHESIS_PROFILE=ci; Hypothesis also picks it
# when $CI is set): 400 examples per property, derandomised, so a CI result depends on the
# code alone (a red run reproduces with the same profile, and a good change is never failed
# by a newly drawn example its code did not touch); finding new examples is the default
# profile's job.
_BUILTIN = settings.get_profile("default")  # not whatever profile $CI made current
PROFILES = {
    "default": settings(
        _BUILTIN, max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    ),
    "ci": settings(
        _BUILTIN,
        max_examples=400,
        derandomize=True,
        database=None,
        print_blob=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
}
for _name, _profile in PROFILES.items():
    settings.register_profile(_name, _profile)
_chosen = os.environ.get("HYPOTHESIS_PROFILE")
if _chosen is not None:
    if _chosen not in PROFILES:
        raise pytest.UsageError(
            f"HYPOTHESIS_PROFILE={_chosen!r} is not a profile; allowed: {sorted(PROFILES)}"
        )
    settings.load_profile(_chosen)


@pytest.fixture(autouse=True)
def _close_wandb_runs():
    """A W&B run left open by one test would swallow the next test's logging."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
