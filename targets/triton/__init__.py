"""The `triton` target: the torch target's program, run by Triton kernels (kernels/) that the
artifact carries as source, with launch configurations chosen at compile time (configs.py)."""

from .lower import lower

__all__ = ["lower"]
