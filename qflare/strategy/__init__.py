"""Aggregation strategies composed from small parts: checks, weighting, transforms, combine, noise and
a server optimiser (see :mod:`qflare.strategy.pipeline` for the presets and their papers; DP-FedAvg,
:mod:`qflare.strategy.dp`, registers as ``dp-fedavg``)."""

from __future__ import annotations

from qflare.strategy.accounting import ACCOUNTANTS, PrivacyAccountant, calibrate_noise_multiplier
from qflare.strategy.aggregators import (
    AGGREGATORS,
    AggregatorContext,
    AggregatorFactory,
    aggregator_detection,
    apply_aggregator,
    register_aggregator,
)
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
from qflare.strategy.bulyan import Bulyan
from qflare.strategy.checks import DEFAULT_MAX_ABS, ExampleCountCheck, FiniteCheck, MaxAbsBound, NormBound, ShapeCheck
from qflare.strategy.combine import CoordinateMedian, Krum, ShareCappedMean, TrimmedMean, WeightedMean
from qflare.strategy.dp import DPFedAvg, PrivacySpent, RoundRelease, dp_fedavg, privacy_of
from qflare.strategy.fltrust import FLTrust, RootUpdate
from qflare.strategy.noise import GaussianNoise
from qflare.strategy.norm_bound import AdaptiveNormBound
from qflare.strategy.pipeline import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_MODEL_ABS,
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
    strategy_factory,
)
from qflare.strategy.server_opt import ServerAdagrad, ServerAdam, ServerMomentum, ServerSGD, ServerYogi
from qflare.strategy.transforms import ClipNorm
from qflare.strategy.weighting import ByExamples, Uniform

__all__ = [
    "ACCOUNTANTS",
    "AGGREGATORS",
    "DEFAULT_MAX_ABS",
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_MAX_MODEL_ABS",
    "STRATEGIES",
    "Accumulator",
    "AdaptiveNormBound",
    "AggregatorContext",
    "AggregatorFactory",
    "Bulyan",
    "ByExamples",
    "ClientUpdate",
    "ClipNorm",
    "Combine",
    "CoordinateMedian",
    "DPFedAvg",
    "ExampleCountCheck",
    "FLTrust",
    "FiniteCheck",
    "GaussianNoise",
    "Krum",
    "MaxAbsBound",
    "Noise",
    "NormBound",
    "Pipeline",
    "PreparedUpdate",
    "PrivacyAccountant",
    "PrivacySpent",
    "RootUpdate",
    "RoundAggregation",
    "RoundRelease",
    "ServerAdagrad",
    "ServerAdam",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "ShapeCheck",
    "ShareCappedMean",
    "StrategyFactory",
    "Transform",
    "TrimmedMean",
    "Uniform",
    "UpdateCheck",
    "WeightedMean",
    "Weighting",
    "aggregator_detection",
    "apply_aggregator",
    "build_strategy",
    "calibrate_noise_multiplier",
    "dp_fedavg",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedmedian",
    "fedtrimmedmean",
    "fedyogi",
    "krum",
    "privacy_of",
    "register_aggregator",
    "register_strategy",
    "strategy_factory",
]
