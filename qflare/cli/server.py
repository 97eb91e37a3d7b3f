"""``qflare server`` (the coordinator over HTTP) and ``qflare token create`` (enrollment tokens)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..config import default_data_dir
from ..data import DATASETS
from ..errors import ConfigError
from ..federation import FederationSpec, suite_by_name
from ..memory import SERVER_ARENAS, limit_arenas
from . import options as opts
from . import runconfig
from .common import FEDERATION_HELP, console, err_console, federation_spec, friendly_errors, writable_dir

if TYPE_CHECKING:
    from ..server import ServerConfig
    from ..server.rotation import RotationResult

__all__ = ["LOG_FORMAT_ENV", "parse_duration", "register", "token_app"]

BLOB_STORE_HELP = "Where blobs live: s3://BUCKET[/PREFIX] (endpoint, keys: AWS_* variables)."
LOG_FORMAT_ENV = "QFLARE_LOG_FORMAT"
"""Environment variable that sets ``--log-format`` (containers set it rather than the command line)."""
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*")
WORKLOAD_OPTIONS = (
    "dataset",
    "data_root",
    "model",
    "rounds",
    "per_round",
    "min_participants",
    "strategy",
    "selector",
    "server_lr",
    "noise_multiplier",
    "dp_epsilon",
    "dp_delta",
    "dp_clip",
    "dp_quantile",
    "aggregator",
    "byzantine",
    "secure_aggregation",
    "seed",
    "round_timeout",
    "suite",
)

token_app = typer.Typer(
    help="Enrollment tokens (one-time, stored only as hashes).", no_args_is_help=True, rich_markup_mode=None
)
server_app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``30m``, ``1h``, ``2d`` or a bare number of seconds; ConfigError otherwise."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        raise ConfigError(f"cannot parse duration {text!r}: use e.g. 90s, 30m, 1h or 2d", code="bad_duration")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"duration {text!r} must be positive", code="bad_duration")
    return seconds


def _passphrase(env_var: str | None) -> bytes | None:
    if env_var is None:
        return None
    value = os.environ.get(env_var)
    if not value:
        raise ConfigError(
            f"--key-passphrase-env names {env_var}, which is not set or empty", code="passphrase_required"
        )
    return value.encode("utf-8")


def server(
    ctx: typer.Context,
    run_config: Path | None = runconfig.config_option(),
    federation: Path | None = typer.Option(None, help=FEDERATION_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8443, min=0, max=65535, help="TCP port."),
    data_dir: Path = typer.Option(default_data_dir(), help="Server state: database, blobs, keys, admin token."),
    blob_store: str | None = typer.Option(
        None, help=BLOB_STORE_HELP + " Default: $QFLARE_BLOB_STORE, else DATA_DIR/blobs."
    ),
    dataset: str = typer.Option(
        "fashion-mnist",
        help=f"Data set whose shape the model takes and whose test split evaluates it; {opts.choices(DATASETS)}.",
    ),
    data_root: Path | None = opts.DATA_ROOT,
    model: str = opts.MODEL,
    rounds: int = typer.Option(30, min=1, help="Federated rounds to run."),
    per_round: int = typer.Option(10, min=1, help="Devices selected each round."),
    min_devices: int = typer.Option(1, min=1, help="Active devices needed before the first round opens."),
    min_participants: int | None = typer.Option(
        None, min=1, help="Updates needed at the deadline (default: every selected device)."
    ),
    strategy: str = opts.STRATEGY,
    selector: str = opts.SELECTOR,
    server_lr: float | None = opts.SERVER_LR,
    noise_multiplier: float | None = opts.NOISE_MULTIPLIER,
    dp_epsilon: float | None = opts.DP_EPSILON,
    dp_delta: float | None = opts.DP_DELTA,
    dp_clip: float | None = opts.DP_CLIP,
    dp_quantile: float | None = opts.DP_QUANTILE,
    aggregator: str = opts.AGGREGATOR,
    byzantine: int | None = opts.BYZANTINE,
    secure_aggregation: bool = opts.SECURE_AGGREGATION,
    seed: int = typer.Option(0, min=0, help="Seed of the initial model and of device selection."),
    round_timeout: float = typer.Option(600.0, min=1.0, help="Seconds before a round's deadline."),
    suite: str = typer.Option(
        "default", help="Crypto suite: default (ML-DSA-65, ML-KEM-768) or high (ML-DSA-87, ML-KEM-1024)."
    ),
    tls_cert: Path | None = typer.Option(
        None, help="TLS certificate (PEM) - defence in depth; the PQ protection is in the application layer."
    ),
    tls_key: Path | None = typer.Option(None, help="TLS private key (PEM)."),
    key_passphrase_env: str | None = typer.Option(
        None, help="Environment variable holding the passphrase of coordinator.key."
    ),
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not evaluate published models on the test split."),
    precision: str | None = opts.PRECISION,
    max_uploads: int = typer.Option(8, min=1, help="Update uploads read and processed at once."),
    rate: float = typer.Option(50.0, min=0.001, help="Requests per second allowed per client address (burst 4x)."),
    session_rate: float = typer.Option(10.0, min=0.001, help="Requests per second allowed per session (burst 4x)."),
    log_level: str = typer.Option("info", help="uvicorn and qflare log level."),
    log_format: str = typer.Option(
        "text",
        envvar=LOG_FORMAT_ENV,
        help="Log format of uvicorn's and qflare's records: text, or json (one object a line, with request "
        "and round ids).",
    ),
    tensorboard: Path | None = typer.Option(
        None, help="Write TensorBoard event files (per-round scalars) here; needs pip install 'qflare[tracking]'."
    ),
    mlflow: str | None = typer.Option(
        None, help="Log per-round metrics to this MLflow tracking URI (file:DIR or http://host:5000); needs mlflow."
    ),
    workers: int = typer.Option(
        1,
        min=1,
        max=64,
        help="Worker processes serving this federation on one port; more than one needs PostgreSQL "
        "(QFLARE_DATABASE_URL). Any worker takes any request; one at a time runs the rounds.",
    ),
    cluster: bool = typer.Option(
        False,
        "--cluster",
        help="Serve as one worker of several, on this or other machines, sharing QFLARE_DATABASE_URL "
        "(PostgreSQL), the blob store (--blob-store) and the coordinator key.",
    ),
    listen_fd: int | None = typer.Option(None, hidden=True, help="An inherited listening socket (--workers)."),
) -> None:
    """Run the coordinator: HTTP API v1 over the post-quantum protocol, rounds, evaluation, metrics.

    "qflare server verify-store" checks the stored blobs instead (see its --help)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..server import HttpLimits, ServerConfig, ServerRuntime, serve, tls_report
    from ..server.logs import configure_logging

    with friendly_errors():
        limit_arenas(SERVER_ARENAS)  # before any thread allocates: bounds RSS under concurrent uploads
        configure_logging(log_level, log_format)

        def build() -> FederationSpec:
            if min_participants is not None and min_participants > per_round:
                raise ConfigError(f"--min-participants {min_participants} is more than --per-round {per_round}")
            spec = FederationSpec(
                dataset=dataset,
                data_root=opts.path_text(data_root),
                model=model,
                rounds=rounds,
                per_round=per_round,
                min_participants=min_participants,
                strategy=strategy,
                selector=selector,
                strategy_args=opts.strategy_args(
                    strategy,
                    server_lr,
                    noise_multiplier=noise_multiplier,
                    dp_epsilon=dp_epsilon,
                    dp_delta=dp_delta,
                    dp_clip=dp_clip,
                    dp_quantile=dp_quantile,
                ),
                aggregator=aggregator,
                byzantine=byzantine,
                secure_aggregation=secure_aggregation,
                seed=seed,
                round_timeout_s=round_timeout,
                suite=suite_by_name(suite),
            )
            opts.check_strategy(spec, root_data=False)
            return spec

        spec = opts.with_precision(federation_spec(ctx, federation, WORKLOAD_OPTIONS, build), precision)
        data_dir = writable_dir(data_dir, "--data-dir", mode=0o700)
        limits = HttpLimits(
            max_concurrent_uploads=max_uploads,
            ip_rate=rate,
            ip_burst=max(1.0, 4 * rate),
            session_rate=session_rate,
            session_burst=max(1.0, 4 * session_rate),
        )
        config = ServerConfig(
            data_dir=data_dir,
            federation=spec,
            min_devices=min_devices,
            evaluate=not no_eval,
            key_passphrase=_passphrase(key_passphrase_env),
            http=limits,
            tensorboard=tensorboard,
            mlflow=mlflow,
            blob_store=blob_store,
            cluster=cluster,
        )
        if workers > 1:
            raise typer.Exit(_run_workers(config, workers, host, port))
        if listen_fd is not None and not cluster:
            raise ConfigError("--listen-fd is for the --cluster workers that --workers starts")
        runtime = ServerRuntime(config)
        effective = runconfig.write_effective(ctx, runtime.data_dir / "server-config.toml")
        console.print(
            f"qflare server · data dir {runtime.data_dir} · database {runtime.db.url} · blobs {runtime.blobs!r}"
        )
        console.print(f"effective configuration: {effective}")
        if runtime.evaluator is not None:
            console.print(f"evaluation precision: {runtime.evaluator.precision.describe()}", highlight=False)
            if runtime.evaluator.precision.warning is not None:
                err_console.print(f"[yellow]warning[/] {runtime.evaluator.precision.warning}", highlight=False)
        console.print(f"coordinator key id {runtime.identity.key_id}{' (new key)' if runtime.identity_created else ''}")
        if runtime.admin.created:
            console.print(
                f"admin token (shown once, also in {runtime.admin.path}): {runtime.admin.value}", soft_wrap=True
            )
        if tls_cert is not None:
            report = tls_report()
            group = report.pq_group or "none (see docs/operations.md: TLS)"
            console.print(f"TLS via {report.openssl}; post-quantum TLS group: {group}")
        else:
            err_console.print("[yellow]no TLS[/]: device traffic is protected by the post-quantum channel only")
        sock = None if listen_fd is None else _inherited_socket(listen_fd)
        if runtime.leadership is not None:
            console.print(f"cluster worker pid {os.getpid()}: one of the workers on this database leads the rounds")
        serve(runtime, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, log_level=log_level.lower(), sock=sock)


def _inherited_socket(fd: int) -> socket.socket:
    """The listening socket ``--workers`` handed this worker as descriptor ``fd``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"--listen-fd {fd} is not an open socket: {exc.strerror or exc}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ConfigError(f"--listen-fd {fd} is not a listening stream socket")
    return sock


def _run_workers(config: ServerConfig, workers: int, host: str, port: int) -> int:
    """The supervisor of ``--workers N`` (:mod:`qflare.server.workers`); its exit status."""
    from ..server.workers import bind_listener, run_workers, worker_command
    from ..storage import Database
    from ..storage.leader import require_cluster_database

    if config.cluster:
        raise ConfigError("--workers starts its --cluster workers itself: give one of the two")
    db = Database.from_env(config.data_dir)
    try:
        require_cluster_database(db)
    finally:
        db.dispose()
    sock = bind_listener(host, port)
    console.print(f"qflare server · {workers} workers on {host}:{port} · database {db.url}")
    return run_workers(worker_command(sys.argv[1:], sock.fileno()), workers, sock)


@token_app.command("create")
def token_create(
    data_dir: Path = typer.Option(default_data_dir(), help="The server's data directory (its database)."),
    expires: str = typer.Option("1h", help="Validity: 30m, 1h, 2d, or seconds."),
    count: int = typer.Option(1, min=1, max=10_000, help="How many tokens."),
    label: str = typer.Option("", help="Free text stored with the tokens."),
    json_: bool = typer.Option(False, "--json", help="Print a JSON list instead of one token per line."),
) -> None:
    """Mint one-time enrollment tokens in the server's database and print them (only hashes are stored)."""
    from ..storage import Database, Store

    with friendly_errors():
        ttl = parse_duration(expires)
        writable_dir(data_dir, "--data-dir", mode=0o700)
        db = Database.from_env(data_dir)
        try:
            db.upgrade()
            tokens = Store(db).create_tokens(count, timedelta(seconds=ttl), label)
        finally:
            db.dispose()
    print(json.dumps(tokens) if json_ else "\n".join(tokens))


@server_app.command("verify-store")
def verify_store(
    data_dir: Path = typer.Option(default_data_dir(), help="The server's data directory (database and blobs)."),
    blob_store: str | None = typer.Option(
        None, help=BLOB_STORE_HELP + " Default: $QFLARE_BLOB_STORE, else DATA_DIR/blobs."
    ),
    json_: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Re-hash every stored blob and check that every blob the database refers to exists.

    Each corrupt or missing blob is reported by where it lives (file path or s3:// URL) with what to do,
    and recorded as a security event.  Exit status 0: all intact; 1: problems found; 2: the store could
    not be opened.  Safe to run while the server runs."""
    from ..storage import Database, Store, blob_store_from_env
    from ..storage.scrub import verify_store as scrub

    with friendly_errors():
        db = Database.from_env(data_dir)
        try:
            db.upgrade()
            report = scrub(Store(db), blob_store_from_env(data_dir, url=blob_store))
        finally:
            db.dispose()
    if json_:
        problems = [
            {"path": p.path, "sha256": p.digest, "problem": p.problem, "referenced": p.referenced}
            for p in report.problems
        ]
        print(json.dumps({"checked": report.checked, "unreferenced": report.unreferenced, "problems": problems}))
    else:
        for p in report.problems:
            err_console.print(f"[bold red]{p.problem}[/] {p.describe()}", soft_wrap=True, markup=True)
        console.print(
            f"verify-store: {report.checked} blob(s) checked, {len(report.problems)} problem(s), "
            f"{report.unreferenced} unreferenced"
        )
    if report.problems:
        raise typer.Exit(1)


@server_app.command("operator-password")
def operator_password(
    data_dir: Path = typer.Option(default_data_dir(), help="The server's data directory."),
    password_env: str = typer.Option(
        "", "--password-env", help="Read the password from this environment variable instead of a prompt."
    ),
) -> None:
    """Set the dashboard's operator password: its argon2id hash goes to DATA_DIR/operator.password (0600).

    The admin token keeps working at the login form; restart the server for a new password to take effect."""
    from ..server.dashboard import write_password_file

    with friendly_errors():
        if password_env:
            password = os.environ.get(password_env, "")
        else:
            password = typer.prompt("Operator password", hide_input=True, confirmation_prompt=True)
        path = write_password_file(Path(data_dir).expanduser(), password)
    console.print(f"operator password hash written to {path}; restart the server to use it")


@server_app.command("rotate-key")
def rotate_key(
    data_dir: Path = typer.Option(default_data_dir(), help="The server's data directory (holds coordinator.key)."),
    reason: str = typer.Option("scheduled", help="Why, recorded in the signed rotation record (printable text)."),
    revoke_old: bool = typer.Option(
        False, "--revoke-old", help="Also record the old key as revoked (it is compromised, or must never return)."
    ),
    revoke_reason: str = typer.Option("compromised", help="The reason recorded in the revocation (--revoke-old)."),
    key_passphrase_env: str | None = typer.Option(
        None, help="Environment variable holding the passphrase of coordinator.key (the new key gets it too)."
    ),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Replace the coordinator's ML-DSA key with a new one and record the rotation, signed by both keys.

    Devices pinned to the old key follow the record (GET /v1/rotations) to the new key without
    re-enrolling.  The record also goes into the provenance ledger (a key_rotation entry signed by both
    keys), so the server's database must be reachable.  The old private key is deleted.  Run it with the
    server stopped (it refuses while a server runs on the data directory), then start the server."""
    from ..server.rotation import rotate_key as rotate
    from ..storage import Database, Store

    with friendly_errors():
        db = Database.from_env(data_dir)
        try:
            db.upgrade()
            result = rotate(
                data_dir,
                _passphrase(key_passphrase_env),
                reason=reason,
                revoke_old=revoke_old,
                revoke_reason=revoke_reason,
                ledger=Store(db),
            )
        finally:
            db.dispose()
    _print_rotation(result, json_, f"coordinator key rotated: {result.old_key_id} -> {result.new_key_id}")


@server_app.command("revoke-key")
def revoke_key(
    key_id: str = typer.Option(..., help="The former coordinator key id to revoke (64 hex)."),
    data_dir: Path = typer.Option(default_data_dir(), help="The server's data directory."),
    reason: str = typer.Option("compromised", help="Why, recorded in the signed revocation record."),
    key_passphrase_env: str | None = typer.Option(
        None, help="Environment variable holding the passphrase of coordinator.key."
    ),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Record that a key rotated away earlier is revoked (signed by the current key).

    Devices that follow the chain then refuse any rotation out of it.  Run it with the server stopped
    (it refuses otherwise), then start the server."""
    from ..server.rotation import revoke_key as revoke
    from ..storage import Database, Store

    with friendly_errors():
        db = Database.from_env(data_dir)
        try:
            db.upgrade()
            result = revoke(data_dir, key_id, _passphrase(key_passphrase_env), reason=reason, ledger=Store(db))
        finally:
            db.dispose()
    _print_rotation(result, json_, f"key {key_id.strip().lower()} revoked (signed by {result.new_key_id})")


def _print_rotation(result: RotationResult, json_: bool, summary: str) -> None:
    records = [
        {"sequence": r.sequence, "kind": r.kind.ledger_kind, "sha256": r.digest.hex(), "reason": r.reason}
        for r in result.records
    ]
    if json_:
        doc = {"old_key_id": result.old_key_id, "new_key_id": result.new_key_id, "records": records}
        print(json.dumps(doc))
        return
    for r in records:
        console.print(f"record #{r['sequence']} {r['kind']} sha256 {r['sha256']} ({r['reason'] or 'no reason'})")
    console.print(summary, soft_wrap=True)
    err_console.print("[yellow]start the server[/]: it signs with the new key and serves the rotation chain")


def register(app: typer.Typer) -> None:
    server_app.callback(invoke_without_command=True)(server)
    app.add_typer(server_app, name="server")
    app.add_typer(token_app, name="token")
