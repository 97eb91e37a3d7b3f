"""Secure aggregation building blocks: Shamir sharing, masks, quantisation, parameters, the graph."""

from __future__ import annotations

import itertools
import math
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qflare.errors import ConfigError, ErrorCode, MalformedError, QflareError, ValidationError
from qflare.secagg import QuantSpec, SecAggParams, choose, dequantize, quantize
from qflare.secagg.graph import neighbours, ring_order
from qflare.secagg.params import _bounds, _log2_gap_probability
from qflare.secagg.prg import TILE_WORDS, add_mask, apply_masks, mask, sub_mask
from qflare.secagg.shamir import MAX_INDEX, SHARE_LEN, P, decode_share, encode_share, reconstruct, split

# -- Shamir ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5])
def test_every_threshold_subset_recovers_and_fewer_do_not(t: int) -> None:
    secret = secrets.token_bytes(32)
    idx = [1, 2, 5, 9, 17, 2**32 - 1, 3][: max(t + 2, 3)]
    shares = split(secret, t, idx)
    for subset in itertools.combinations(idx, t):
        assert reconstruct({i: shares[i] for i in subset}, t) == secret
    if t > 1:
        with pytest.raises(QflareError) as info:
            reconstruct({i: shares[i] for i in idx[: t - 1]}, t)
        assert info.value.code is ErrorCode.SECAGG_ABORTED


def test_shares_are_points_of_one_polynomial_of_degree_t_minus_1() -> None:
    secret, t = secrets.token_bytes(32), 4
    shares = split(secret, t, range(1, 11))
    # Lagrange from any t points predicts every other point (degree exactly <= t-1).
    base = list(range(1, t + 1))
    for x in range(t + 1, 11):
        acc = 0
        for xi in base:
            num = den = 1
            for xj in base:
                if xj != xi:
                    num, den = num * (x - xj) % P, den * (xi - xj) % P
            acc = (acc + shares[xi] * num * pow(den, -1, P)) % P
        assert acc == shares[x]


def test_t_minus_1_shares_fit_every_secret() -> None:
    """Perfect secrecy, checked: for t-1 shares and any other secret there is a consistent t-th share."""
    t = 3
    shares = split(b"\x01" * 32, t, [1, 2, 3])
    other = b"\x02" * 32
    # Solve for f(3) with f(0) = other, f(1), f(2) fixed: the interpolation through (0, other), (1, .), (2, .)
    pts = {0: int.from_bytes(other, "big"), 1: shares[1], 2: shares[2]}
    y3 = 0
    for xi, yi in pts.items():
        num = den = 1
        for xj in pts:
            if xj != xi:
                num, den = num * (3 - xj) % P, den * (xi - xj) % P
        y3 = (y3 + yi * num * pow(den, -1, P)) % P
    assert reconstruct({1: shares[1], 2: shares[2], 3: y3}, t) == other


def test_a_wrong_share_changes_or_refuses_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3])
    small = dict(shares)
    small[2] = (shares[2] + 1) % P  # moves f(0) by L_2(0) = -3: another secret, not detectable here
    assert reconstruct(small, 3) != secret
    shares[2] = secrets.randbelow(P)  # a random share: the result leaves the 256-bit range (p ~ 2^-265)
    with pytest.raises(QflareError) as info:
        reconstruct(shares, 3)
    assert info.value.code is ErrorCode.BAD_SHARE


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ((b"x" * 31, 2, [1, 2]), ErrorCode.BAD_ARGUMENT),
        ((b"x" * 32, 3, [1, 2]), ErrorCode.BAD_ARGUMENT),
        ((b"x" * 32, 0, [1, 2]), ErrorCode.BAD_ARGUMENT),
        ((b"x" * 32, 2, [1, 1]), ErrorCode.BAD_ARGUMENT),
        ((b"x" * 32, 2, [0, 1]), ErrorCode.BAD_ARGUMENT),
        ((b"x" * 32, 2, [1, MAX_INDEX + 1]), ErrorCode.BAD_ARGUMENT),
    ],
)
def test_split_refuses_bad_arguments(args: tuple, code: ErrorCode) -> None:
    with pytest.raises(ConfigError) as info:
        split(*args)
    assert info.value.code is code


def test_share_encoding_is_canonical() -> None:
    assert decode_share(encode_share(P - 1)) == P - 1
    assert len(encode_share(0)) == SHARE_LEN
    for bad in (P.to_bytes(SHARE_LEN, "big"), (2**528 - 1).to_bytes(SHARE_LEN, "big"), b"\x00" * 65, b""):
        with pytest.raises(MalformedError):
            decode_share(bad)
    with pytest.raises(ConfigError):
        encode_share(P)


# -- masks ----------------------------------------------------------------------------------------------


def test_mask_is_the_aes256_ctr_keystream() -> None:
    seed = bytes(range(32))
    ref = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * 1001))
    assert mask(seed, 1001).tobytes() == ref
    assert mask(seed, 1001).dtype == np.uint32
    assert not np.array_equal(mask(seed, 64), mask(bytes(31) + b"\x01", 64))


def test_add_then_sub_mask_is_identity_mod_2_32() -> None:
    x = np.random.default_rng(1).integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32)
    y = x.copy()
    add_mask(y, b"k" * 32)
    assert not np.array_equal(x, y)
    sub_mask(y, b"k" * 32)
    assert np.array_equal(x, y)


def test_mask_refuses_a_short_seed() -> None:
    with pytest.raises(ConfigError):
        mask(b"k" * 16, 10)


def _keystream_words(seed: bytes, n: int) -> np.ndarray:
    raw = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


@pytest.mark.parametrize("n", [1, 7, TILE_WORDS - 1, TILE_WORDS, 2 * TILE_WORDS + 5])
def test_apply_masks_is_each_mask_added_or_subtracted_over_any_workers(n: int) -> None:
    rng = np.random.default_rng(n)
    seeds = [(rng.bytes(32), add) for add in (True, False, False, True, False)]
    x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    want = x.copy()
    for seed, add in seeds:  # the reference: whole keystreams from pyca, one at a time
        if add:
            want += _keystream_words(seed, n)
        else:
            want -= _keystream_words(seed, n)
    for workers in (1, 2, 3, 64):  # ranges of tiles start mid-stream at their own counter block
        y = x.copy()
        apply_masks(y, seeds, workers=workers)
        assert np.array_equal(y, want), workers


def test_apply_masks_checks_every_seed_and_argument_before_changing_anything() -> None:
    x = np.arange(100, dtype=np.uint32)
    y = x.copy()
    with pytest.raises(ConfigError) as exc:
        apply_masks(y, [(b"k" * 32, True), (b"k" * 16, False)])
    assert exc.value.code == ErrorCode.BAD_SEED
    assert np.array_equal(x, y)
    for bad in (x.astype(np.int64), x.reshape(10, 10)):
        with pytest.raises(ConfigError):
            apply_masks(bad, [(b"k" * 32, True)])  # type: ignore[arg-type]
    for workers in (0, 65, True):
        with pytest.raises(ConfigError):
            apply_masks(y, [(b"k" * 32, True)], workers=workers)
    assert np.array_equal(x, y)


# -- quantisation ---------------------------------------------------------------------------------------


def test_worst_case_sum_fits_31_bits() -> None:
    spec = QuantSpec(clip=0.5, max_devices=1000, max_weight=16)
    one = quantize(np.full(4, 10.0), spec.max_weight, spec)  # clipped to +clip at the largest weight
    neg = quantize(np.full(4, -10.0), spec.max_weight, spec)
    assert int(one[:-1].view(np.int32).max()) * spec.max_devices <= 2**31 - 1
    assert int(neg[:-1].view(np.int32).min()) * spec.max_devices >= -(2**31 - 1)
    total = np.zeros(5, dtype=np.uint32)
    for _ in range(spec.max_devices):
        total += one
    mean, wsum = dequantize(total, spec.max_devices, spec)
    assert wsum == spec.max_devices * spec.max_weight
    assert np.allclose(mean, 0.5, atol=spec.error_bound)


def test_weighted_mean_is_within_the_error_bound() -> None:
    rng = np.random.default_rng(3)
    spec = QuantSpec()
    xs = [rng.normal(0, 0.5, 2000) for _ in range(40)]
    ws = [int(w) for w in rng.integers(1, spec.max_weight + 1, 40)]
    total = np.zeros(2001, dtype=np.uint32)
    for x, w in zip(xs, ws, strict=True):
        total += quantize(x, w, spec)
    mean, wsum = dequantize(total, 40, spec)
    ref = sum(np.clip(x, -spec.clip, spec.clip) * w for x, w in zip(xs, ws, strict=True)) / sum(ws)
    assert wsum == sum(ws)
    assert np.abs(mean - ref).max() <= spec.error_bound
    assert spec.error_bound == pytest.approx(3.725e-6, rel=1e-3)


@pytest.mark.parametrize(("values", "weight", "code"), [([np.nan], 1, "non_finite"), ([1.0], 0, "bad_weight")])
def test_quantize_refuses(values: list[float], weight: int, code: str) -> None:
    with pytest.raises(ValidationError) as info:
        quantize(np.array(values), weight, QuantSpec())
    assert info.value.code == code


def test_quantspec_refuses_no_headroom() -> None:
    with pytest.raises(ConfigError):
        QuantSpec(clip=1.0, max_devices=1_000_000, max_weight=10_000)
    with pytest.raises(ConfigError):
        QuantSpec(clip=float("inf"))


def test_dequantize_refuses_an_impossible_weight_sum() -> None:
    total = np.zeros(3, dtype=np.uint32)
    total[-1] = 1000
    with pytest.raises(ValidationError) as info:
        dequantize(total, 2, QuantSpec())
    assert info.value.code is ErrorCode.AGGREGATE_OUT_OF_BOUNDS


# -- parameters -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 10, 50, 100, 200, 1000])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.2])
def test_chosen_parameters_meet_both_conditions(n: int, dropout: float) -> None:
    p = choose(n, dropout=dropout, corruption=0.1)
    c_max, d_max = _bounds(n, p.k, dropout, 0.1, 40, 20)
    assert 2 * p.t > p.k + c_max
    assert p.t <= p.k - d_max
    assert p.complete or _log2_gap_probability(n, p.k, dropout + 0.1) <= -40
    if not p.complete and p.k > 2:  # the smallest such k
        k2 = p.k - 2
        c2, d2 = _bounds(n, k2, dropout, 0.1, 40, 20)
        t2 = (k2 + c2) // 2 + 1
        assert t2 > k2 - d2 or _log2_gap_probability(n, k2, dropout + 0.1) > -40


def test_sparse_graphs_grow_logarithmically() -> None:
    assert choose(1000, dropout=0.1).k < 100
    assert choose(5000, dropout=0.1).k < 130


def test_impossible_requirements_are_refused() -> None:
    with pytest.raises(ConfigError):
        choose(10, dropout=0.5, corruption=0.4)
    with pytest.raises(ConfigError):
        SecAggParams(10, 3, 2)  # odd k below n-1
    with pytest.raises(ConfigError):
        SecAggParams(10, 4, 5)


# -- graph ----------------------------------------------------------------------------------------------


def test_graph_is_k_regular_symmetric_and_seeded() -> None:
    p = SecAggParams(60, 10, 7)
    g = neighbours(p, b"s" * 32)
    assert sorted(g) == list(range(1, 61))
    for u, nb in g.items():
        assert len(nb) == 10 and u not in nb
        assert all(u in g[v] for v in nb)
    assert neighbours(p, b"s" * 32) == g
    assert neighbours(p, b"t" * 32) != g
    assert sorted(ring_order(60, b"s" * 32)) == list(range(1, 61))


def test_complete_graph() -> None:
    g = neighbours(SecAggParams(5, 4, 3), b"s" * 32)
    assert g[3] == frozenset({1, 2, 4, 5})


def test_ring_order_is_uniform_enough() -> None:
    """Position of device 1 over many seeds: chi-square against uniform on 8 positions."""
    counts = [0] * 8
    for i in range(4000):
        counts[ring_order(8, i.to_bytes(32, "big")).index(1)] += 1
    chi2 = sum((c - 500) ** 2 / 500 for c in counts)
    assert chi2 < 30.0  # 7 dof: p < 1e-4 beyond this
    assert math.isfinite(chi2)


@pytest.mark.parametrize(("population", "marked", "draws"), [(9, 3, 4), (20, 5, 8), (30, 0, 5), (12, 12, 6)])
def test_tail_bound_is_the_exact_hypergeometric_tail(population: int, marked: int, draws: int) -> None:
    from qflare.secagg.params import _tail_bound

    total = math.comb(population, draws)

    def tail(c: int) -> float:  # P[X > c], exact
        hi = min(marked, draws)
        return (
            sum(math.comb(marked, x) * math.comb(population - marked, draws - x) for x in range(c + 1, hi + 1)) / total
        )

    for log2_budget in (-1.0, -5.0, -20.0):
        c = _tail_bound(population, marked, draws, log2_budget)
        assert tail(c) <= 2.0**log2_budget
        assert c == 0 or tail(c - 1) > 2.0**log2_budget


def test_choose_records_the_tolerated_corruptions_and_the_quorum() -> None:
    p = choose(100, dropout=0.1, corruption=0.1)
    assert (p.corrupt, p.quorum) == (10, 56)
    assert SecAggParams(8, 7, 4).quorum == 5  # corrupt defaults to 0: a plain majority
    with pytest.raises(ConfigError):
        SecAggParams(5, 4, 3, corrupt=5)
    with pytest.raises(ConfigError) as info:  # 55 devices left cannot sign: more than (100 + 20) / 2 must
        choose(100, dropout=0.45, corruption=0.2)
    assert "sign the survivor set" in str(info.value)
