"""Targets: lower an IR module to a runtime program. `TARGETS` maps the names model.yaml accepts."""

from . import torch as torch_target

TARGETS = {"torch": torch_target.lower}
