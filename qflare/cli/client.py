"""``qflare client``: one federated device process talking to ``qflare server`` over HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

import torch
import typer

from ..crypto import Suite, VerifyKey
from ..data import DATASETS, PARTITIONERS
from ..device import DeviceClient, DeviceState, default_state_dir, load_workload, pin_server_key, read_pin_file
from ..errors import ConfigError
from ..federation import FederationSpec
from ..models import model_names
from ..training import TrainConfig
from ..transport import HttpTransport, TransportError
from .common import FEDERATION_HELP, federation_spec, friendly_errors

__all__ = ["client", "register"]

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


def _fetch_identity(transport: HttpTransport, pinned: str, wait_s: float) -> tuple[VerifyKey, Suite]:
    """GET /v1/identity (waiting up to ``wait_s`` for the server to come up) and check it against the pin."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return pin_server_key(transport.get_json("/v1/identity"), pinned)
        except TransportError as exc:
            if time.monotonic() > deadline:
                raise
            logging.getLogger("qflare.client").warning("coordinator not reachable yet [%s]; retrying", exc.code)
            time.sleep(1.0)


def client(
    ctx: typer.Context,
    federation: Path | None = typer.Option(None, help=FEDERATION_HELP),
    server: str = typer.Option(..., help="Coordinator base URL, e.g. https://fl.example.org:8443."),
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
    timeout: float = typer.Option(60.0, min=1.0, help="HTTP timeout per request, seconds."),
    ca_cert: Path | None = typer.Option(None, help="CA bundle to verify the server's TLS certificate."),
    give_up_after: float = typer.Option(300.0, help="Stop when the server stays unreachable this long, seconds."),
    log_level: str = typer.Option("INFO", help="Logging level."),
    json_: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
) -> None:
    """Run one federated device: enroll (first start), then train whenever the coordinator selects it."""
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
            state = DeviceState(state_dir or default_state_dir(index), passphrase=passphrase)
            pinned = state.pin(pin)
            with HttpTransport(server, timeout=timeout, verify=str(ca_cert) if ca_cert else True) as transport:
                server_key, suite = _fetch_identity(transport, pinned, give_up_after)
                if federation is not None and suite != spec.suite:  # options name no suite: the server's is used
                    raise ConfigError(
                        f"the coordinator uses suite {suite.name}, the federation spec says {spec.suite.name}",
                        code="suite_mismatch",
                    )
                workload = load_workload(spec, index)
                dc = DeviceClient(
                    transport=transport, state=state, server_key=server_key, workload=workload, suite=suite
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
                dc.ensure_enrolled(token)
                summary = dc.run(max_rounds=max_rounds, poll_interval=poll_interval, give_up_after_s=give_up_after)
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


def register(app: typer.Typer) -> None:
    app.command("client")(client)
