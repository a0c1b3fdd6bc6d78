"""The calibration / drift report: metrics against the unquantized reference, HTML, drift gates."""

from .gates import DriftError, check, diff, load_report, table
from .html import render
from .metrics import build_report

__all__ = ["DriftError", "build_report", "check", "diff", "load_report", "render", "table"]
