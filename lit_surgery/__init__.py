"""lit-surgery: train a network while optimising its topology (Schiessler et al., 2021)."""

from lit_surgery.core.export import load_exported

__version__ = "0.1.0"
__all__ = ["load_exported"]
