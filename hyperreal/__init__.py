"""hyperreal: adapt a frozen text-to-image diffusion model without touching it."""

__version__ = "0.1.0"
