import torch

# Small networks train fastest on one thread, and the suite must not oversubscribe CI's
# two cores when tests run next to each other.
torch.set_num_threads(1)
