"""Post-quantum secure aggregation (Bonawitz et al. 2017 with the SecAgg+ neighbour graph of Bell et al.
2020): the coordinator learns only the sum of the devices' quantised updates, and survives dropouts.

Modules, one job each: ``shamir`` (t-of-n sharing over GF(2^521-1)), ``prg`` (AES-256-CTR masks in
Z_{2^32}), ``quantize`` (fixed point with clipping, weights), ``params`` (t and k from n and the tolerated
dropout/corruption), ``graph`` (the neighbour graph), ``keys`` (round configuration, per-round secrets,
sealed KEM channels), ``messages`` (wire formats), ``client`` and ``server`` (the phase logic).
See docs/secure-aggregation.md.
"""

from __future__ import annotations

from qflare.secagg.client import ClientPhase, SecAggClient
from qflare.secagg.keys import SecAggConfig
from qflare.secagg.params import SecAggParams, choose
from qflare.secagg.quantize import QuantSpec, dequantize, quantize
from qflare.secagg.server import SecAggResult, SecAggServer, ServerPhase

__all__ = [
    "ClientPhase",
    "QuantSpec",
    "SecAggClient",
    "SecAggConfig",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "ServerPhase",
    "choose",
    "dequantize",
    "quantize",
]
