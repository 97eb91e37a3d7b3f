"""Aggregation strategies composed from small parts: checks, weighting, transforms, combine, noise and
a server optimiser (see :mod:`qflare.strategy.pipeline` for the presets and their papers)."""

from __future__ import annotations

from qflare.strategy.base import (
    Accumulator,
    ClientUpdate,
    Combine,
    Noise,
    ServerOptimizer,
    Transform,
    UpdateCheck,
    Weighting,
)
from qflare.strategy.checks import ExampleCountCheck, FiniteCheck, NormBound, ShapeCheck
from qflare.strategy.combine import CoordinateMedian, Krum, TrimmedMean, WeightedMean
from qflare.strategy.noise import GaussianNoise
from qflare.strategy.pipeline import (
    STRATEGIES,
    Pipeline,
    PreparedUpdate,
    RoundAggregation,
    StrategyFactory,
    build_strategy,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedmedian,
    fedtrimmedmean,
    fedyogi,
    krum,
    register_strategy,
)
from qflare.strategy.server_opt import ServerAdagrad, ServerAdam, ServerMomentum, ServerSGD, ServerYogi
from qflare.strategy.transforms import ClipNorm
from qflare.strategy.weighting import ByExamples, Uniform

__all__ = [
    "STRATEGIES",
    "Accumulator",
    "ByExamples",
    "ClientUpdate",
    "ClipNorm",
    "Combine",
    "CoordinateMedian",
    "ExampleCountCheck",
    "FiniteCheck",
    "GaussianNoise",
    "Krum",
    "Noise",
    "NormBound",
    "Pipeline",
    "PreparedUpdate",
    "RoundAggregation",
    "ServerAdagrad",
    "ServerAdam",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "ShapeCheck",
    "StrategyFactory",
    "Transform",
    "TrimmedMean",
    "Uniform",
    "UpdateCheck",
    "WeightedMean",
    "Weighting",
    "build_strategy",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedmedian",
    "fedtrimmedmean",
    "fedyogi",
    "krum",
    "register_strategy",
]
