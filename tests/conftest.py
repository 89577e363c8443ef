import os

import pytest
import torch

# Small networks train fastest on one thread, and the suite must not oversubscribe CI's
# two cores when tests run next to each other.
torch.set_num_threads(1)

os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _close_wandb_runs():
    """A W&B run left open by one test would swallow the next test's logging."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
