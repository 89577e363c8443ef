"""lit-surgery: train a network while optimising its topology (Schiessler et al., 2021)."""

__version__ = "0.1.0"
