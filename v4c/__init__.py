"""v4c: an ahead-of-time compiler and lean runtime for DeepSeek-V4-architecture models."""

__version__ = "0.1.0"
