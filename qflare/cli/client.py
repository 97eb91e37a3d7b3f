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

import tenacity
import torch
import typer

from ..crypto import SigningKey, Suite, VerifyKey
from ..data import load_local_data
from ..data.local import DEFAULT_MAX_BYTES
from ..device import (
    DeviceClient,
    DeviceState,
    ModelAnnouncement,
    Workload,
    check_model,
    default_state_dir,
    load_workload,
    local_workload,
    normalize_key_id,
    parse_announcement,
    read_pin_file,
)
from ..device.loop import Patience
from ..device.proofs import verify_proofs
from ..device.rekey import MAX_ROTATIONS_RESPONSE, ROTATIONS_PATH, repin
from ..device.state import SUITES_BY_NAME
from ..errors import (
    AuthError,
    CircuitOpenError,
    ConfigError,
    ErrorCode,
    MalformedError,
    QflareError,
    Retry,
    ServerUnavailableError,
)
from ..federation import FederationSpec
from ..protocol import Route
from ..protocol.proofs import MAX_ANSWER_BYTES
from ..transport import HttpTransport
from ..transport.http import RetryPolicy, model_response_limit
from . import options as opts
from .common import FEDERATION_HELP, fail, federation_spec, friendly_errors, writable_dir

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
    "weight_decay",
    "prox_mu",
    "max_grad_norm",
)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind normally: the HTTP client closes, state files are already durable


IDENTITY_PATH = "/v1/identity"
_PERMANENT_STATUS_CODES = (ErrorCode.HTTP_ERROR, ErrorCode.NOT_FOUND, ErrorCode.METHOD_NOT_ALLOWED)


class _Again(Exception):
    """One failed identity fetch that is waited out (internal)."""


def _fetch_identity(
    transport: HttpTransport,
    state: DeviceState,
    pinned: str,
    patience_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[VerifyKey, Suite, ModelAnnouncement | None]:
    """GET /v1/identity (waiting up to ``patience_s`` for the server to come up) and check it against the
    pin - following a verified key rotation (``/v1/rotations``, :func:`qflare.device.rekey.repin`) when the
    coordinator rotated its key; the coordinator's key, suite and announced model.

    Outages and unauthenticated error answers are waited out within the patience (its clock starts when
    the first failing request began), logging the URL and the cause whenever the cause changes.  What
    retrying cannot heal stops the device at once: a key that does not hash to the pin (or an unknown
    suite) - the wrong server or the wrong pin, and nothing was sent to that server - and a URL where no
    QFLARE coordinator answers (a 4xx without a QFLARE refusal: ``bad_server_url``)."""
    log = logging.getLogger("qflare.client")
    patience = Patience(patience_s, clock)
    url = transport.base_url + IDENTITY_PATH
    last_cause = [""]

    def attempt() -> tuple[VerifyKey, Suite, ModelAnnouncement | None]:
        started = clock()
        try:
            doc = transport.get_json(IDENTITY_PATH)
            if not isinstance(doc, dict):
                raise MalformedError(f"{url} answered JSON that is not an object", code="malformed")
            fetch = lambda path: doc if path == IDENTITY_PATH else transport.get_json(path)  # noqa: E731
            return (*repin(state, fetch, pinned), parse_announcement(doc))
        except QflareError as exc:
            if _not_a_coordinator(exc):
                raise ConfigError(
                    f"{url} answered HTTP {exc.http_status} ({str(exc)[:200]}): no QFLARE coordinator there; "
                    "check --server (scheme, host, port, path)",
                    code="bad_server_url",
                ) from None
            if exc.code == ErrorCode.TLS_ERROR or (exc.retry is not Retry.TRANSIENT and not exc.unauthenticated):
                raise  # TLS that cannot work with this URL (https against http, an untrusted certificate)
            patience.failed(exc, f"fetching the coordinator's identity from {url}", started)
            # the cause, not the symptom: an open circuit or spent retries name the failure behind them
            outage = isinstance(exc, (CircuitOpenError, ServerUnavailableError))
            cause = (transport.breaker.last_failure if outage else "") or f"[{exc.code}] {_without_counts(str(exc))}"
            if cause != last_cause[0]:
                last_cause[0] = cause
                log.warning(
                    "coordinator at %s not reachable yet: %s; retrying for up to %.0f s more",
                    url,
                    cause,
                    patience.remaining(),
                )
            raise _Again from exc

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Again),
        wait=lambda _state: min(1.0, patience.remaining() + 0.05),  # the last try lands just past the patience
        stop=tenacity.stop_never,
        sleep=sleep,
        reraise=True,
    )
    return retrying(attempt)


def _not_a_coordinator(exc: QflareError) -> bool:
    """A plain 4xx (no QFLARE refusal, or no such route) to ``GET /v1/identity``, which every coordinator
    serves: the URL is wrong, and waiting will not change that (408/425/429 are waited out)."""
    return (
        exc.unauthenticated
        and exc.code in _PERMANENT_STATUS_CODES
        and 400 <= exc.http_status < 500
        and exc.http_status not in (408, 425, 429)
    )


def _without_counts(message: str) -> str:
    """A failure message without the attempt counts and times that differ from one retry to the next."""
    _head, sep, tail = message.partition(" attempt(s): ")
    return tail if sep else message


def _pin(state: DeviceState, given: str | None) -> tuple[str, tuple[str, AuthError] | None]:
    """The state dir's pin, and - when the operator gives another key id than the stored pin (e.g. the
    coordinator's new ``coordinator.keyid`` after a rotation) - that id and the refusal to raise unless
    a verified rotation chain leads the stored pin to it."""
    try:
        return state.pin(given), None
    except AuthError as exc:
        if exc.code != "server_key_mismatch" or given is None:
            raise
        return state.pin(None), (normalize_key_id(given), exc)


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
    dataset: str = opts.DATASET,
    data_root: Path | None = opts.DATA_ROOT,
    data: Path | None = typer.Option(
        None,
        "--data",
        help="This device's own data, trained on whole instead of a --dataset partition: a .npz file with "
        "arrays x and y, or a folder of class_name/*.png images (see docs/operations.md).",
    ),
    max_data_bytes: int = typer.Option(
        DEFAULT_MAX_BYTES, min=1, help="Refuse --data larger than this many bytes (file, or decoded)."
    ),
    model: str = opts.MODEL,
    partition: str = opts.PARTITION,
    alpha: float = typer.Option(0.5, help="Dirichlet concentration."),
    shards_per_device: int = typer.Option(2, min=1, help="Shards per device for --partition shards."),
    devices: int = typer.Option(100, min=1, help="Number of partitions the data set is split into."),
    index: int = typer.Option(0, min=0, help="Which partition this device trains on (0-based)."),
    seed: int = typer.Option(0, min=0, help="Seed of the partition and of local shuffles (as in qflare simulate)."),
    epochs: int = opts.EPOCHS,
    batch_size: int = opts.BATCH_SIZE,
    lr: float = opts.LR,
    momentum: float = opts.MOMENTUM,
    weight_decay: float = opts.WEIGHT_DECAY,
    prox_mu: float = opts.PROX_MU,
    max_grad_norm: float | None = opts.MAX_GRAD_NORM,
    device: str | None = typer.Option(
        None, help="Torch device for training: cpu, cuda, cuda:N or auto (default: the spec's, else cpu)."
    ),
    precision: str | None = opts.PRECISION,
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
        fail("--server is required to run a device (the coordinator URL)")
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
                    data_root=opts.path_text(data_root),
                    model=model,
                    partition=partition,
                    alpha=alpha,
                    shards_per_device=shards_per_device,
                    devices=devices,
                    seed=seed,
                    train=opts.train_config(
                        epochs=epochs,
                        batch_size=batch_size,
                        lr=lr,
                        momentum=momentum,
                        weight_decay=weight_decay,
                        prox_mu=prox_mu,
                        max_grad_norm=max_grad_norm,
                    ),
                )

            spec = federation_spec(ctx, federation, WORKLOAD_OPTIONS, build)
            if device is not None:  # where this machine trains is its own business, not the workload's
                spec = spec.replace(train=replace(spec.train, device=device))
            spec = opts.with_precision(spec, precision)  # so is its precision: nothing on the wire depends on it
            pin = server_key_id or (read_pin_file(server_key_file) if server_key_file else None)
            passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
            state = DeviceState(
                writable_dir(state_dir or default_state_dir(index), "--state-dir", mode=0o700), passphrase=passphrase
            )
            pinned, moved_to = _pin(state, pin)  # nothing is stored until the served key matched it
            retry = RetryPolicy(max_elapsed_s=min(5.0, max(0.5, patience / 4)))  # never overruns --patience much
            verify = str(ca_cert) if ca_cert else True
            with HttpTransport(server, timeout=timeout, verify=verify, retry=retry) as transport:
                transport.limit_response(ROTATIONS_PATH, MAX_ROTATIONS_RESPONSE)
                server_key, suite, announced = _fetch_identity(transport, state, pinned, patience)
                if moved_to is not None and server_key.key_id != moved_to[0]:
                    raise moved_to[1]
                pinned = server_key.key_id  # the pin, or the key a verified rotation moved it to
                if federation is not None and suite != spec.suite:  # options name no suite: the server's is used
                    raise ConfigError(
                        f"the coordinator uses suite {suite.name}, the federation spec says {spec.suite.name}",
                        code="suite_mismatch",
                    )
                check_model(announced, str(spec.model))  # before any data is loaded, any key made, any token spent
                workload = _workload(spec, index, data, announced, max_data_bytes)
                check_model(announced, str(spec.model), workload.layout)
                transport.limit_response(Route.MODEL, model_response_limit(workload.layout))
                transport.limit_response(Route.PROOF, MAX_ANSWER_BYTES + 4096)  # + AEAD framing
                dc = DeviceClient(
                    transport=transport,
                    state=state,
                    server_key=server_key,
                    workload=workload,
                    suite=suite,
                    max_trainings=max_trainings_per_hour,
                    training_period_s=3600.0,
                    rekey=lambda: repin(state, transport.get_json),
                )
                trained_in = workload.trainer.precision
                if trained_in.warning is not None:
                    logging.getLogger("qflare.client").warning("%s", trained_in.warning)
                logging.getLogger("qflare.client").info(
                    "device %s... %s (%d examples, precision %s), coordinator %s... at %s",
                    dc.device_id[:16],
                    f"own data {data}" if data is not None else f"partition {index}/{spec.devices}",
                    len(workload.targets),
                    trained_in.describe(),
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


def _workload(
    spec: FederationSpec, index: int, data: Path | None, announced: ModelAnnouncement | None, max_bytes: int
) -> Workload:
    """Partition ``index`` of the spec's data set, or (``--data``) the device's own examples, checked
    against the input shape and classes of the model the coordinator announces."""
    if data is None:
        return load_workload(spec, index)
    if announced is None or announced.input_shape is None or announced.num_classes is None:
        raise ConfigError(
            "--data needs the coordinator to announce its model's input shape and classes; this one does not "
            "(an older qflare server): upgrade it, or use --dataset",
            code="config_error",
        )
    local = load_local_data(
        data,
        input_shape=announced.input_shape,
        num_classes=announced.num_classes,
        mean=announced.mean or (0.0,) * announced.input_shape[0],
        std=announced.std or (1.0,) * announced.input_shape[0],
        max_bytes=max_bytes,
    )
    return local_workload(spec, local, index)


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
            former: tuple[VerifyKey, ...] = ()
        else:
            key, former = state.load_server_key(), state.former_server_keys()
        checks = state.verify_receipts(key, former=former)
        device_id = SigningKey.load(state.key_path, passphrase).key_id if state.key_path.exists() else None
        if device_id is not None:
            revoked = sorted(state.rotation_chain().revoked)
            checks += verify_proofs(state, key, device_id, former=former, revoked=revoked)
    bad = [c for c in checks if not c.ok]
    for c in checks:
        if json_:
            print(json.dumps(asdict(c)))
        elif not c.ok:
            where = "receipts.jsonl" if c.kind == "receipt" else "proofs.jsonl"
            print(f"{where} line {c.line}: round {c.round} update {str(c.update_hash)[:16]}...: FAILED {c.reason}")
    receipts = [c for c in checks if c.kind == "receipt"]
    proofs = [c for c in checks if c.kind == "proof"]
    summary = (
        f"{sum(c.ok for c in receipts)} of {len(receipts)} receipts verify against coordinator {key.key_id[:16]}...; "
        f"{sum(c.ok for c in proofs)} of {len(proofs)} inclusion proofs verify"
    )
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
        rich_markup_mode=None,
    )
    group.callback()(client)
    group.command("verify-receipts")(verify_receipts)
    app.add_typer(group, name="client")
