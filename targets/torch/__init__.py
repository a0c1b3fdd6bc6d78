"""The `torch` target: every op runs as the runtime's plain-PyTorch kernel of the same name."""

from .lower import lower

__all__ = ["lower"]
