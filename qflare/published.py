"""The coordinator's published model versions, read from its data directory, and any one written out as a
model file (:mod:`qflare.model_file`) after checking it.

``qflare server`` writes ``model.json`` (the registered model name, input shape, class count and
architecture fingerprint) into its data directory at start-up; the versions themselves are rows of the
database (version, round, hash, parent hash, signed GLOBAL_MODEL envelope, metrics) and blobs in the
blob store (``blobs/``, or the ``s3://`` store ``$QFLARE_BLOB_STORE`` names).  :func:`export_version` verifies, before writing anything: the envelope's ML-DSA signature
against the coordinator's public key (``coordinator.pub``, optionally pinned by key id), that it signs
this version and this hash, the blob's size and SHA-256 against the signed ones, and the blob's
architecture against ``model.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .crypto import VerifyKey
from .crypto.envelope import Field, MsgType, SignedEnvelope
from .errors import ArchitectureMismatchError, AuthError, ConfigError, QflareError, StaleModelError, ValidationError
from .files import write_atomic
from .model_file import write_model_file
from .models import create_model
from .protocol.records import ModelRow
from .storage import Database, Store, blob_store_from_env
from .storage.db import DATABASE_URL_ENV, SQLITE_FILENAME
from .wire import ParamLayout, decode_blob, sha256_hex

__all__ = [
    "ARCHITECTURE_FILE",
    "Architecture",
    "ExportedModel",
    "export_version",
    "ledger_entries_by_round",
    "list_versions",
]

ARCHITECTURE_FILE = "model.json"
_PUB_FILE = "coordinator.pub"
_MAX_ARCH_BYTES = 64 * 1024


@dataclass(frozen=True)
class Architecture:
    """What model the coordinator of a data directory trains: enough to rebuild the module."""

    model: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    fingerprint: str

    def save(self, data_dir: Path) -> Path:
        doc = {
            "model": self.model,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
        }
        return write_atomic(Path(data_dir) / ARCHITECTURE_FILE, json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, data_dir: Path) -> Architecture:
        path = Path(data_dir) / ARCHITECTURE_FILE
        try:
            raw = path.read_bytes()[: _MAX_ARCH_BYTES + 1]
        except OSError as exc:
            raise ConfigError(
                f"{path}: {exc.strerror or exc} (qflare server writes it at start-up; is this a server data dir?)",
                code="bad_path",
            ) from None
        try:
            doc = json.loads(raw) if len(raw) <= _MAX_ARCH_BYTES else {}
            shape = tuple(int(d) for d in doc["input_shape"])
            c, h, w = shape
            arch = cls(
                str(doc["model"]), str(doc["dataset"]), (c, h, w), int(doc["num_classes"]), str(doc["fingerprint"])
            )
        except (TypeError, KeyError, ValueError, RecursionError):
            raise ValidationError(f"{path} is not a valid architecture file", code="bad_json") from None
        return arch


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    version: int
    round: int | None
    sha256: str
    key_id: str


def _open_db(data_dir: Path) -> Database:
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir}: no such folder", code="bad_path")
    if not os.environ.get(DATABASE_URL_ENV, "").strip() and not (data_dir / SQLITE_FILENAME).is_file():
        raise ConfigError(f"--data-dir {data_dir}: no coordinator database ({SQLITE_FILENAME}) there", code="bad_path")
    return Database.from_env(data_dir)


def list_versions(data_dir: Path) -> list[ModelRow]:
    """Every published model version of the coordinator in ``data_dir``, oldest first (read only)."""
    db = _open_db(data_dir)
    try:
        return Store(db).list_models()
    finally:
        db.dispose()


def ledger_entries_by_round(data_dir: Path) -> dict[int, tuple[int, str]]:
    """``round -> (seq, entry_hash)`` of the provenance ledger's round entries in ``data_dir`` (read only):
    the lineage ``qflare models list`` shows next to each version."""
    db = _open_db(data_dir)
    try:
        store, found, after = Store(db), {}, 0
        while page := store.ledger_entries(after_seq=after, limit=1000):
            for row in page:
                if row.kind == "round" and row.round_number is not None:
                    found[row.round_number] = (row.seq, row.entry_hash)
            after = page[-1].seq
        return found
    finally:
        db.dispose()


def _coordinator_keys(data_dir: Path, alg: str, key_id: str | None) -> list[VerifyKey]:
    """The keys that may have signed a version: ``coordinator.pub``, and - after key rotations - every key
    of the verified rotation chain in ``rotations.jsonl`` (a version published before a rotation is signed
    by the key of its time).  ``key_id``, if given, must be one of them."""
    from .server.rotation import load_chain  # reads and verifies rotations.jsonl (both signatures per record)

    path = Path(data_dir) / _PUB_FILE
    try:
        raw = bytes.fromhex(path.read_text(encoding="ascii", errors="replace").strip())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}", code="no_server_key") from None
    except ValueError:
        raise ConfigError(f"{path} does not hold a hex public key", code="bad_key_file") from None
    current = VerifyKey.from_bytes(alg, raw)
    chain = load_chain(Path(data_dir))
    keys = [k for k in chain.keys if k.alg == alg] or [current]
    if current.key_id not in {k.key_id for k in keys}:
        raise ConfigError(
            f"{path} holds key {current.key_id}, which is not the current key of rotations.jsonl",
            code="rotation_incomplete",
        )
    if key_id is not None and key_id.strip().lower() not in {k.key_id for k in keys}:
        raise AuthError(
            f"{path} holds key id {current.key_id} (and its rotation chain no key {key_id}), not the pinned {key_id}",
            code="server_key_mismatch",
        )
    return keys


def _verified_blob(data_dir: Path, row: ModelRow, key_id: str | None) -> tuple[bytes, VerifyKey]:
    env = SignedEnvelope.parse(bytes(row.signature), expected_type=MsgType.GLOBAL_MODEL)
    keys = _coordinator_keys(data_dir, env.suite.sig, key_id)
    for key in reversed(keys):  # the current key first: most versions are signed by it
        try:
            env.verify(key)
            break
        except QflareError as exc:
            if exc.code != "bad_signature" or key is keys[0]:
                raise
    if env.get_int(Field.MODEL_VERSION) != row.version or env.get(Field.MODEL_HASH).hex() != row.model_hash:
        raise ValidationError(
            f"version {row.version}: the signature covers version {env.get_int(Field.MODEL_VERSION)} "
            f"hash {env.get(Field.MODEL_HASH).hex()}, not the database's {row.model_hash}",
            code="hash_mismatch",
        )
    blob = blob_store_from_env(data_dir).get(row.model_hash)  # $QFLARE_BLOB_STORE or DATA_DIR/blobs; hash-checked
    if len(blob) != env.get_int(Field.PAYLOAD_SIZE) or sha256_hex(blob) != env.get(Field.MODEL_HASH).hex():
        raise ValidationError(f"version {row.version}: the blob is not the one signed", code="hash_mismatch")
    return blob, key


def export_version(data_dir: Path, version: int | None, out: Path, *, key_id: str | None = None) -> ExportedModel:
    """Write model ``version`` (None: the latest) of the coordinator in ``data_dir`` to ``out`` as a model
    file, after the checks in the module docstring; nothing is written when one fails."""
    db = _open_db(data_dir)
    try:
        store = Store(db)
        row = store.latest_model() if version is None else store.get_model(version)
    finally:
        db.dispose()
    if row is None:
        what = "no model version has been published" if version is None else f"no model version {version}"
        raise StaleModelError(f"{what} in {data_dir}", code="unknown_model")
    arch = Architecture.load(data_dir)
    blob, key = _verified_blob(data_dir, row, key_id)
    module = create_model(arch.model, arch.input_shape, arch.num_classes)
    layout = ParamLayout.from_module(module)
    if layout.fingerprint != arch.fingerprint:
        raise ArchitectureMismatchError(
            f"{ARCHITECTURE_FILE} says fingerprint {arch.fingerprint}, but model {arch.model!r} here builds "
            f"{layout.fingerprint} (a different version of the model code?)",
        )
    flat = decode_blob(blob, layout, kind="model", verified_sha256=row.model_hash).flat
    provenance: dict[str, Any] = {
        "source": "qflare coordinator",
        "dataset": arch.dataset,
        "version": row.version,
        "round": "" if row.round_number is None else row.round_number,
        "model_sha256": row.model_hash,
        "parent_sha256": row.parent_hash or "",
        "created": row.created_at.isoformat(),
        "coordinator_key_id": key.key_id,
    }
    path = write_model_file(
        out,
        layout,
        flat,
        model=arch.model,
        input_shape=arch.input_shape,
        num_classes=arch.num_classes,
        provenance={k: str(v) for k, v in provenance.items()},
    )
    return ExportedModel(path, row.version, row.round_number, row.model_hash, key.key_id)
