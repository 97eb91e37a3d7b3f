"""``qflare bench``: the benchmarks, printing figures (and ratios against references run alongside)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..data import DATASETS
from ..errors import ConfigError
from ..models import model_names
from ..precision import PRECISIONS
from . import options as opts
from .common import console, err_console, friendly_errors, writable_dir

app = typer.Typer(
    help="Benchmarks: figures and ratios, measured in this run.", no_args_is_help=True, rich_markup_mode=None
)


def _show(result: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        if not isinstance(v, (dict, list)):
            table.add_row(k, str(v))
    console.print(table)


@app.command("fmnist-dir05")
def fmnist_dir05(
    rounds: int = typer.Option(30, min=1, help="Rounds for both runs."),
    workers: int = typer.Option(0, min=0, help="QFLARE training threads (0 = one per core)."),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    precision: str = typer.Option(
        "fp32",
        help=f"Also run QFLARE in this precision next to fp32 and compare; {opts.choices(PRECISIONS)} "
        "(fp32: the fp32 run only).",
    ),
    batched_devices: bool = typer.Option(
        False, "--batched-devices", help="QFLARE trains each round's devices together (simulate --batched-devices)."
    ),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """QFLARE simulate vs a bare PyTorch loop on fmnist-dir05 (both in this invocation) + FedAvg bandwidth;
    with --precision bf16 (or auto), QFLARE in that precision too, against fp32 in the same invocation."""
    from ..bench.fmnist import run_fmnist_dir05

    with friendly_errors():
        result = run_fmnist_dir05(
            rounds, workers=workers, data_root=data_root, precision=precision, batched_devices=batched_devices
        )
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"fmnist-dir05, {rounds} rounds")
        curves = {"qflare": result["qflare"]["accuracy"], "bare": result["bare"]["accuracy"]}
        prec = result.get("precision")
        if prec is not None:
            _show(prec, f"precision {prec['detail']} vs fp32")
            if "run" in prec:
                curves[f"qflare {prec['resolved']}"] = prec["run"]["accuracy"]
                console.print(
                    {"step_ms_one_thread": prec["step_ms_one_thread"], "meets_targets": prec["meets_targets"]}
                )
        console.print(curves)


@app.command("batched-devices")
def batched_devices(
    rounds: int = typer.Option(30, min=1, help="Rounds for both runs."),
    device: str = typer.Option("cuda", help="Torch device for training: cuda (the target), cuda:N, auto or cpu."),
    workers: int = typer.Option(
        0, min=0, help="Threads for the devices' protocol steps and evaluation (0 = one per core)."
    ),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """fmnist-dir05 trained by the per-device loop and with --batched-devices, one after the other on one
    device: the rounds' time, the speed-up and the accuracy curves (target: 30 rounds <= 5 s on an H200)."""
    from ..bench.fmnist import run_batched_devices
    from ..training import resolve_device

    with friendly_errors():
        resolve_device(device)  # no CUDA: one clear line before two long runs
        result = run_batched_devices(rounds, device=device, workers=workers, data_root=data_root)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"batched devices on fmnist-dir05, {rounds} rounds, {device}")
        console.print({"loop": result["loop"]["accuracy"], "batched": result["batched"]["accuracy"]})


@app.command("crypto")
def crypto(
    repeats: int = typer.Option(30, min=3, help="Repetitions of each operation."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Handshake, seal+sign and open+verify of a 6.65 MB update, for the default and high suites,
    against one device's local training epoch on fmnist-dir05 measured in the same run."""
    from ..bench.crypto import run_crypto_bench

    with friendly_errors():
        result = run_crypto_bench(repeats)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, "crypto")


@app.command("protocol-overhead")
def protocol_overhead(
    rounds: int = typer.Option(30, min=1, help="Rounds for both runs."),
    workers: int = typer.Option(0, min=0, help="Training threads (0 = one per core)."),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """fmnist-dir05 with the secure protocol (PQ sessions, signatures, database) on and off, in one run."""
    from ..bench.fmnist import run_protocol_overhead

    with friendly_errors():
        result = run_protocol_overhead(rounds, workers=workers, data_root=data_root)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"protocol overhead on fmnist-dir05, {rounds} rounds")


@app.command("ingest")
def ingest(
    devices: int = typer.Option(100, min=1, max=1000, help="Devices uploading at once (one connection each)."),
    max_uploads: int = typer.Option(8, min=1, help="The server's --max-uploads (update bodies processed at once)."),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    workers: int = typer.Option(
        1, min=1, max=64, help="The server's --workers; more than one runs on PostgreSQL (a temporary database)."
    ),
    postgres: bool = typer.Option(
        False,
        "--postgres",
        help="Run a single server on a temporary PostgreSQL database too (the baseline for --workers).",
    ),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """N devices upload a sealed 6.65 MB FedAvg-CNN update to one `qflare server` at once: throughput,
    latency, server RSS, and the server's database checked against the receipts (lost / duplicated)."""
    from ..bench.ingest import run_ingest_bench
    from ..storage.testing import temporary_postgres_database

    with friendly_errors():
        if postgres and workers == 1:
            with temporary_postgres_database(prefix="qflare_bench_") as url:
                result = run_ingest_bench(devices, max_uploads=max_uploads, data_root=data_root, database_url=url)
        else:
            result = run_ingest_bench(devices, max_uploads=max_uploads, data_root=data_root, workers=workers)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"ingest: {devices} concurrent uploads, {max_uploads} upload slots")
        console.print({"targets": result["targets"], "meets_targets": result["meets_targets"]})


@app.command("network")
def network(
    rounds: int = typer.Option(30, min=1, help="Rounds for both runs."),
    dataset: str = typer.Option(
        "fashion-mnist", help=f"Data set (fmnist-dir05 uses fashion-mnist); {opts.choices(DATASETS)}."
    ),
    model: str = typer.Option(
        "fedavg-cnn", help=f"Model (fmnist-dir05 uses fedavg-cnn); {opts.choices(model_names())}."
    ),
    devices: int = typer.Option(100, min=1, help="Devices in the federation."),
    per_round: int = typer.Option(10, min=1, help="Devices selected each round."),
    workers: int = typer.Option(0, min=0, help="Training threads of the driver (0 = one per core)."),
    data_root: str | None = typer.Option(None, help="Data set folder (default: search the usual places)."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """fmnist-dir05 as `qflare server` + devices over HTTP vs the in-process simulation, in one run:
    per-round overhead of the network path, accuracy curves, peak RSS of each process tree."""
    from ..bench.network import run_network_bench

    with friendly_errors():
        result = run_network_bench(
            rounds,
            dataset=dataset,
            model=model,
            devices=devices,
            per_round=per_round,
            workers=workers,
            data_root=data_root,
        )
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"network vs in-process, {result['workload']}, {rounds} rounds")
        console.print({"inprocess": result["inprocess"]["accuracy"], "network": result["network"]["accuracy"]})


@app.command("abuse")
def abuse(
    duration_s: float = typer.Option(20.0, min=0.5, max=30.0, help="Seconds each attacker runs (at most 30)."),
    devices: int = typer.Option(4, min=2, max=32, help="Honest devices (one is left unselected each round)."),
    rounds: int = typer.Option(8, min=1, max=100, help="Honest rounds, paced over the attack window."),
    data_root: str | None = typer.Option(None, help="Data set folder (default: search the usual places)."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """An honest federation (digits/mlp) against one `qflare server` while attackers run one after the other
    from loopback addresses: slow uploads, a handshake flood from 16 addresses, an enrollment flood with
    garbage tokens, oversized and malformed bodies.  Honest latency, rounds, server RSS, 5xx, orphan blobs."""
    from ..bench.abuse import run_abuse_bench

    with friendly_errors():
        result = run_abuse_bench(duration_s, devices=devices, rounds=rounds, data_root=data_root)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"abuse: {devices} honest devices, {duration_s:g} s per attacker")
        console.print({"attackers": result["attackers"], "meets_targets": result["meets_targets"]})


@app.command("ledger")
def ledger(
    rounds: int = typer.Option(10_000, min=1, max=1_000_000, help="Round entries in the synthetic export."),
    updates: int = typer.Option(100, min=0, max=10_000, help="Updates per round entry."),
    workers: int | None = typer.Option(None, min=1, help="Verifier processes (default: CPUs, at most 8)."),
    envelope_rounds: int = typer.Option(3, min=0, max=100, help="Entries of the device-signature sample (0: skip)."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Offline verification of a provenance ledger export: a synthetic export of ROUNDS entries with
    UPDATES updates each (real chain, ML-DSA-65 signatures, Merkle roots), timed; device signatures timed
    on a separate sample.  Target: 10,000 rounds of 100 updates verify in 5 s or less."""
    from ..bench.ledger import run_ledger_bench

    with friendly_errors():
        result = run_ledger_bench(rounds, updates, workers=workers, envelope_rounds=envelope_rounds)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"ledger verify: {rounds} rounds x {updates} updates")
        console.print({"envelope_sample": result["envelope_sample"], "meets_target": result["meets_target"]})


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError("--epsilons must name at least one budget")
    return values


@app.command("dp")
def dp(
    epsilons: str = typer.Option("1,2,4,8,16", help="Privacy budgets to run, comma-separated (one run each)."),
    rounds: int = typer.Option(30, min=1, help="Rounds of every run (the noise multiplier is calibrated to them)."),
    delta: float = typer.Option(1e-5, help="Delta of every (epsilon, delta)."),
    clip: float = typer.Option(1.0, help="Initial clip norm (adaptive clipping to the median norm moves it)."),
    per_round: int = typer.Option(10, min=1, max=100, help="Devices a round (of fmnist-dir05's 100)."),
    baseline: bool = typer.Option(True, help="Also run non-private FedAvg as the reference."),
    workers: int = typer.Option(0, min=0, help="Training threads (0 = one per core)."),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    out: Path = typer.Option(Path("bench-dp"), help="Folder for dp.json and dp.png."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Test accuracy against epsilon of DP-FedAvg on fmnist-dir05: one run per budget, the noise multiplier
    calibrated so the rounds spend it; writes dp.json and dp.png (accuracy against epsilon)."""
    from ..bench.dp import run_dp_bench, write_dp_bench

    with friendly_errors():
        budgets = _epsilons(epsilons)
        folder = writable_dir(out, "--out")
        result = run_dp_bench(
            budgets,
            rounds=rounds,
            delta=delta,
            clip_norm=clip,
            per_round=per_round,
            workers=workers,
            data_root=data_root,
            baseline=baseline,
        )
        paths = write_dp_bench(result, folder)
    if json_:
        print(json.dumps(result))
        return
    table = Table(title=f"DP-FedAvg on fmnist-dir05, {rounds} rounds, delta {delta:g}")
    for col in ("run", "noise multiplier", "epsilon spent", "epsilon (no sampling)", "final accuracy", "rounds"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        eps = r["epsilon_spent"]
        table.add_row(
            r["run"],
            str(r.get("noise_multiplier", "-")),
            "-" if eps is None else f"{eps:.3f}",
            "-" if r["epsilon_unsampled"] is None else f"{r['epsilon_unsampled']:.3f}",
            "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}",
            str(r["rounds_run"]) if "error" not in r else f"failed: {r['error']}",
        )
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command("defenses")
def defenses(
    rounds: int = typer.Option(30, min=1, help="Rounds of every run."),
    attacks: str = typer.Option(
        "sign-flip,scale,gaussian,label-flip,backdoor,min-max", help="Comma-separated attacks (docs/defences.md)."
    ),
    aggregators: str = typer.Option(
        "none,median,trimmed-mean,multi-krum,bulyan,fltrust,norm-bound,reputation",
        help="Comma-separated --aggregator values.",
    ),
    malicious: float = typer.Option(0.2, help="Share of attacking devices."),
    workers: int = typer.Option(0, min=0, help="Training threads (0 = one per core)."),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    png: Path = typer.Option(Path("defenses.png"), help="Where to write the table as a PNG."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Attack x defence on fmnist-dir05: final accuracy, detection precision/recall, backdoor success and
    each defence's clean accuracy; one simulation per cell (expensive: see docs/defences.md)."""
    from ..bench.defenses import run_defences, write_png

    with friendly_errors():
        names = [a.strip() for a in attacks.split(",") if a.strip()]
        aggs = [a.strip() for a in aggregators.split(",") if a.strip()]
        if not names or not aggs:
            raise ConfigError("--attacks and --aggregators each need at least one name")
        png_path = writable_dir(png.parent if str(png.parent) else Path("."), "--png") / png.name

        def progress(attack: str, agg: str, acc: float) -> None:  # on stderr with --json: stdout is the JSON
            (err_console if json_ else console).print(f"{agg:>16} · {attack:<10} accuracy {acc:.4f}", highlight=False)

        result = run_defences(
            rounds,
            attacks=names,
            aggregators=aggs,
            malicious=malicious,
            workers=workers,
            data_root=data_root,
            on_cell=progress,
        )
        try:
            write_png(result, png_path)
        except OSError as exc:
            raise ConfigError(f"--png {png_path}: {exc.strerror or exc}", code="bad_path") from None
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"defences, fmnist-dir05, {rounds} rounds")
        console.print(result["accuracy"])
        console.print(f"wrote {png_path}")


@app.command("secagg")
def secagg(
    devices: int = typer.Option(100, min=3, max=1000, help="Devices in the round."),
    dropout: float = typer.Option(
        0.1, min=0.0, max=0.9, help="Fraction of devices that drop before their masked input (also tolerated)."
    ),
    seed: int = typer.Option(0, help="Seed of the updates, weights and who drops."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One post-quantum secure-aggregation round of the FedAvg CNN's size against plaintext FedAvg of the
    same updates: exact match, bytes sent per device, device and coordinator compute."""
    from ..bench.secagg import run_secagg_bench

    with friendly_errors():
        result = run_secagg_bench(devices, dropout, seed=seed)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"secure aggregation, {devices} devices, {dropout:.0%} dropout")


@app.command("secagg-scaling")
def secagg_scaling(
    devices: str = typer.Option("10,50,100,200", help="Device counts, comma-separated (one round each)."),
    dropouts: str = typer.Option("0,0.1", help="Dropout fractions, comma-separated."),
    seed: int = typer.Option(0, help="Seed of the updates, weights and who drops."),
    out: Path = typer.Option(Path("bench-secagg"), help="Folder for secagg.json and secagg.png."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """`bench secagg` for every device count and dropout; writes secagg.json and secagg.png (figures against n)."""
    from ..bench.secagg import run_secagg_scaling, write_secagg_scaling

    with friendly_errors():
        try:
            ns = [int(x) for x in devices.split(",") if x.strip()]
            fs = [float(x) for x in dropouts.split(",") if x.strip()]
        except ValueError:
            raise ConfigError("--devices and --dropouts are comma-separated numbers") from None
        if not ns or not fs or any(not 3 <= n <= 1000 for n in ns) or any(not 0 <= f < 1 for f in fs):
            raise ConfigError("--devices in 3..1000 and --dropouts in [0, 1), at least one each")
        folder = writable_dir(out, "--out")
        result = run_secagg_scaling(ns, fs, seed=seed)
        paths = write_secagg_scaling(result, folder)
    if json_:
        print(json.dumps(result))
        return
    for r in result["runs"]:
        _show(r, f"secure aggregation, {r['devices']} devices, {r['dropout']:.0%} dropout")
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command("backends")
def backends(
    rounds: int = typer.Option(30, min=1, help="Rounds for each run."),
    workers: int = typer.Option(
        0, min=0, help="Training threads (thread) and device-host actors (ray); 0 = one per core."
    ),
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    flower_python: str | None = typer.Option(
        None,
        help="Also run the Flower reference (qflare/bench/flower_reference.py) with this Python, one that has "
        "flwr[simulation]==1.42.* and torch (a separate environment).",
    ),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """fmnist-dir05 with `qflare simulate --backend thread` and then `--backend ray` (child processes, in this
    invocation): wall time, peak RSS of each process tree, load average, and whether the models are identical;
    with --flower-python, Flower 1.42 on Ray too."""
    from ..bench.backends import run_backends
    from ..simulation_ray import require_ray

    with friendly_errors():
        require_ray()
        result = run_backends(rounds, workers=workers, data_root=data_root, flower_python=flower_python)
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"simulation backends on fmnist-dir05, {rounds} rounds")


@app.command("ray-scale")
def ray_scale(
    devices: int = typer.Option(1000, min=1, help="Enrolled devices (each its own ML-DSA identity and session)."),
    per_round: int = typer.Option(100, min=1, help="Devices a round."),
    rounds: int = typer.Option(2, min=1, help="Rounds."),
    workers: int = typer.Option(0, min=0, help="Device-host actors (0 = one per CPU Ray offers)."),
    ray_address: str | None = opts.RAY_ADDRESS,
    data_root: str | None = typer.Option(None, help="Fashion-MNIST folder (default: search the usual places)."),
    partition: str = typer.Option(
        "dirichlet",
        help="How the 60,000 examples are split (fmnist-dir05: dirichlet, alpha 0.5, at least 10 examples a "
        "device, so at most 6,000 devices; iid gives every device at least one).",
    ),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The Ray backend with many enrolled devices (fmnist-dir05's data and model): enrollment time, the device
    hosts' memory per idle enrolled device, and round times."""
    from ..bench.backends import run_ray_scale
    from ..simulation_ray import require_ray

    with friendly_errors():
        require_ray()
        opts.check_per_round(per_round, devices)
        result = run_ray_scale(
            devices,
            per_round=per_round,
            rounds=rounds,
            hosts=workers,
            address=ray_address,
            data_root=data_root,
            partition=partition,
        )
    if json_:
        print(json.dumps(result))
    else:
        _show(result, f"Ray backend, {devices} devices, {per_round} a round")
        console.print({"round_s": result["round_s"]})
