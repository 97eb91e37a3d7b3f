"""``qflare client``: one federated device process talking to ``qflare server`` over HTTP;
``qflare client verify-receipts``: re-verify a device's stored receipts against the pinned key."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

import torch
import typer

from ..crypto import Suite, VerifyKey
from ..data import DATASETS, PARTITIONERS
from ..device import DeviceClient, DeviceState, default_state_dir, load_workload, pin_server_key, read_pin_file
from ..device.loop import Patience
from ..device.state import SUITES_BY_NAME
from ..errors import AuthError, ConfigError, QflareError, Retry
from ..federation import FederationSpec
from ..models import model_names
from ..protocol import Route
from ..training import TrainConfig
from ..transport import HttpTransport
from ..transport.http import model_response_limit
from .common import FEDERATION_HELP, federation_spec, friendly_errors, writable_dir

__all__ = ["client", "register", "verify_receipts"]

PASSPHRASE_ENV = "QFLARE_KEY_PASSPHRASE"
TOKEN_ENV = "QFLARE_ENROLL_TOKEN"
WORKLOAD_OPTIONS = (
    "dataset",
    "data_root",
    "model",
    "partition",
    "alpha",
    "shards_per_device",
    "devices",
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind normally: the HTTP client closes, state files are already durable


def _fetch_identity(
    transport: HttpTransport, pinned: str, patience_s: float, sleep: Callable[[float], None] = time.sleep
) -> tuple[VerifyKey, Suite]:
    """GET /v1/identity (waiting up to ``patience_s`` for the server to come up) and check it against the
    pin.  Outages and unauthenticated error answers are waited out within the patience; a key that does
    not hash to the pin (or an unknown suite) stops the device at once: that is a configuration error
    the operator must see (the wrong server or the wrong pin), and nothing was sent to that server."""
    patience = Patience(patience_s)
    while True:
        try:
            return pin_server_key(transport.get_json("/v1/identity"), pinned)
        except QflareError as exc:
            if exc.retry is not Retry.TRANSIENT and not exc.unauthenticated:
                raise
            patience.failed(exc, "fetching the coordinator's identity")
            logging.getLogger("qflare.client").warning("coordinator not reachable yet [%s]; retrying", exc.code)
            sleep(1.0)


def client(
    ctx: typer.Context,
    federation: Path | None = typer.Option(None, help=FEDERATION_HELP),
    server: str | None = typer.Option(None, help="Coordinator base URL, e.g. https://fl.example.org:8443."),
    server_key_id: str | None = typer.Option(
        None, help="Pinned coordinator key id (SHA-256 of its ML-DSA public key, hex)."
    ),
    server_key_file: Path | None = typer.Option(
        None, help="File with the pinned key id (coordinator.keyid) or public key (coordinator.pub)."
    ),
    token: str | None = typer.Option(
        None, envvar=TOKEN_ENV, help=f"One-time enrollment token (first start only; or ${TOKEN_ENV})."
    ),
    state_dir: Path | None = typer.Option(
        None, help="Device state (key, enrollment, pin, receipts); default ~/.local/state/qflare/device-<index>."
    ),
    dataset: str = typer.Option("fashion-mnist", help=f"Local data set: {', '.join(DATASETS)}."),
    data_root: Path | None = typer.Option(None, help="Folder holding the data set files."),
    model: str = typer.Option("fedavg-cnn", help=f"Model (must match the server's): {', '.join(model_names())}."),
    partition: str = typer.Option("dirichlet", help=f"Partitioner: {', '.join(PARTITIONERS)}."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration."),
    shards_per_device: int = typer.Option(2, help="Shards per device for --partition shards."),
    devices: int = typer.Option(100, min=1, help="Number of partitions the data set is split into."),
    index: int = typer.Option(0, min=0, help="Which partition this device trains on (0-based)."),
    seed: int = typer.Option(0, help="Seed of the partition and of local shuffles (as in qflare simulate)."),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round."),
    batch_size: int = typer.Option(32, min=1, help="Local mini-batch size."),
    lr: float = typer.Option(0.05, help="Local SGD learning rate."),
    momentum: float = typer.Option(0.0, help="Local SGD momentum."),
    device: str | None = typer.Option(
        None, help="Torch device for training: cpu, cuda, cuda:N or auto (default: the spec's, else cpu)."
    ),
    threads: int = typer.Option(1, "--threads", "--workers", min=1, help="Torch intra-op threads."),
    max_rounds: int | None = typer.Option(None, min=1, help="Stop after this many acknowledged updates."),
    poll_interval: float = typer.Option(1.0, min=0.05, help="Seconds between task polls (jittered)."),
    timeout: float = typer.Option(
        60.0, min=1.0, help="HTTP timeout per request, seconds: for the whole answer, not only between reads."
    ),
    ca_cert: Path | None = typer.Option(None, help="CA bundle to verify the server's TLS certificate."),
    patience: float = typer.Option(
        300.0,
        "--patience",
        "--give-up-after",
        min=1.0,
        help="Stop after failing this long without progress (pinning, enrollment, handshake and rounds), seconds.",
    ),
    max_trainings_per_hour: int = typer.Option(
        60, min=1, help="Train at most this many times per hour, whatever the coordinator asks."
    ),
    log_level: str = typer.Option("INFO", help="Logging level."),
    json_: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
) -> None:
    """Run one federated device: enroll (first start), then train whenever the coordinator selects it."""
    if ctx.invoked_subcommand is not None:
        return
    if not server:
        raise typer.BadParameter("--server is required to run a device", param_hint="--server")
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise at INFO
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(threads)
    try:
        with friendly_errors():

            def build() -> FederationSpec:
                return FederationSpec(
                    dataset=dataset,
                    data_root=str(data_root) if data_root else None,
                    model=model,
                    partition=partition,
                    alpha=alpha,
                    shards_per_device=shards_per_device,
                    devices=devices,
                    seed=seed,
                    train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum),
                )

            spec = federation_spec(ctx, federation, WORKLOAD_OPTIONS, build)
            if device is not None:  # where this machine trains is its own business, not the workload's
                spec = spec.replace(train=replace(spec.train, device=device))
            pin = server_key_id or (read_pin_file(server_key_file) if server_key_file else None)
            passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
            state = DeviceState(
                writable_dir(state_dir or default_state_dir(index), "--state-dir", mode=0o700), passphrase=passphrase
            )
            pinned = state.pin(pin)
            with HttpTransport(server, timeout=timeout, verify=str(ca_cert) if ca_cert else True) as transport:
                server_key, suite = _fetch_identity(transport, pinned, patience)
                if federation is not None and suite != spec.suite:  # options name no suite: the server's is used
                    raise ConfigError(
                        f"the coordinator uses suite {suite.name}, the federation spec says {spec.suite.name}",
                        code="suite_mismatch",
                    )
                workload = load_workload(spec, index)
                transport.limit_response(Route.MODEL, model_response_limit(workload.layout))
                dc = DeviceClient(
                    transport=transport,
                    state=state,
                    server_key=server_key,
                    workload=workload,
                    suite=suite,
                    max_trainings=max_trainings_per_hour,
                    training_period_s=3600.0,
                )
                logging.getLogger("qflare.client").info(
                    "device %s... partition %d/%d (%d examples), coordinator %s... at %s",
                    dc.device_id[:16],
                    index,
                    spec.devices,
                    len(workload.targets),
                    pinned[:16],
                    server,
                )
                dc.ensure_enrolled(token, patience_s=patience)
                summary = dc.run(max_rounds=max_rounds, poll_interval=poll_interval, give_up_after_s=patience)
    except KeyboardInterrupt:
        logging.getLogger("qflare.client").info("interrupted: stopping")
        raise typer.Exit(130) from None
    if json_:
        out = asdict(summary)
        out["receipts"] = [asdict(r) for r in summary.receipts]
        print(json.dumps(out))
    else:
        logging.getLogger("qflare.client").info(
            "done (%s): trained rounds %s, %d receipts, %d sessions",
            summary.reason,
            summary.rounds_trained,
            len(summary.receipts),
            summary.sessions,
        )


def verify_receipts(
    state_dir: Path = typer.Option(..., help="The device's state directory (holds receipts.jsonl)."),
    server_key_file: Path | None = typer.Option(
        None, help="The coordinator's public key (coordinator.pub); default: the key saved in the state dir."
    ),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object per receipt on stdout."),
) -> None:
    """Re-verify every stored receipt against the pinned coordinator key; exit 1 if any fails."""
    with friendly_errors():
        passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
        if not state_dir.is_dir():
            raise ConfigError(f"no state directory {state_dir}", code="config_error")
        state = DeviceState(state_dir, passphrase=passphrase)
        if server_key_file is not None:
            pinned = state.pin(None)
            raw = bytes.fromhex(server_key_file.read_text(encoding="ascii").strip())
            if read_pin_file(server_key_file) != pinned:
                raise AuthError(
                    f"{server_key_file} is not the key {state_dir} is pinned to", code="server_key_mismatch"
                )
            key = VerifyKey.from_bytes(_alg_of(raw), raw)
        else:
            key = state.load_server_key()
        checks = state.verify_receipts(key)
    bad = [c for c in checks if not c.ok]
    for c in checks:
        if json_:
            print(json.dumps(asdict(c)))
        elif not c.ok:
            print(f"line {c.line}: round {c.round} update {str(c.update_hash)[:16]}...: FAILED {c.reason}")
    summary = f"{len(checks) - len(bad)} of {len(checks)} receipts verify against coordinator {key.key_id[:16]}..."
    print(summary, file=sys.stderr if json_ else sys.stdout)
    if bad:
        raise typer.Exit(1)


def _alg_of(raw: bytes) -> str:
    """The ML-DSA parameter set of a raw public key, by its length."""
    for suite in SUITES_BY_NAME.values():
        try:
            return VerifyKey.from_bytes(suite.sig, raw).alg
        except QflareError:
            continue
    raise ConfigError("the coordinator key file holds no ML-DSA public key", code="bad_key_file")


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        invoke_without_command=True,
        help="Run a federated device (or manage its state: verify-receipts).",
        add_completion=False,
    )
    group.callback()(client)
    group.command("verify-receipts")(verify_receipts)
    app.add_typer(group, name="client")
