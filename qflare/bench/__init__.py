"""Benchmark runners behind ``qflare bench``; figures are printed, never asserted."""

from .procs import PeakRss, run_measured

__all__ = ["PeakRss", "run_measured"]
