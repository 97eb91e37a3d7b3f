"""``qflare server`` as a real process (TLS, SIGTERM), ``qflare token create``, and the TLS group preference."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from qflare.cli import app
from qflare.server.launch import PQ_GROUPS, prefer_pq_groups, tls_report
from qflare.storage import Database, Store, hash_token

ENV = {k: v for k, v in os.environ.items() if k not in ("QFLARE_DATABASE_URL", "QFLARE_ADMIN_TOKEN")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qflare test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.slow
def test_server_process_over_tls_and_sigterm(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    data, port = tmp_path / "data", _free_port()
    argv = [
        sys.executable,
        "-m",
        "qflare",
        "server",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--rounds",
        "1",
        "--per-round",
        "1",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    ]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    verify = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify, timeout=5.0) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.25)  # real time: the server is a real process
            info = client.get("/v1/identity").json()
            assert info["key_id"] == (data / "coordinator.keyid").read_text().strip()
            admin = (data / "admin.token").read_text().strip()
            minted = client.post("/v1/admin/tokens", json={"count": 2}, headers={"Authorization": f"Bearer {admin}"})
            assert minted.status_code == 200 and len(minted.json()["tokens"]) == 2
            assert "qflare_http_requests_total" in client.get("/metrics").text
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert f"admin token (shown once, also in {data / 'admin.token'}): {admin}" in output.replace("\n", "")
    assert info["key_id"] in output
    effective = tomllib.loads((data / "server-config.toml").read_text(encoding="utf-8"))
    assert (effective["port"], effective["rounds"], effective["dataset"]) == (port, 1, "digits")
    db = Database(f"sqlite:///{data / 'qflare.db'}")
    try:  # the database was closed cleanly and holds what the server did
        assert all(Store(db).get_token(t) is not None for t in minted.json()["tokens"])
    finally:
        db.dispose()


def test_token_create_stores_only_hashes(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "token",
            "create",
            "--data-dir",
            str(tmp_path),
            "--expires",
            "30m",
            "--count",
            "3",
            "--label",
            "batch-7",
            "--json",
        ],
        env={"QFLARE_DATABASE_URL": ""},
    )
    assert result.exit_code == 0, result.output
    tokens = json.loads(result.stdout)
    assert len(tokens) == 3 and len(set(tokens)) == 3
    db = Database(f"sqlite:///{tmp_path / 'qflare.db'}")
    try:
        store = Store(db)
        for token in tokens:
            row = store.get_token(token)
            assert row is not None and row.label == "batch-7" and row.token_hash == hash_token(token)
            assert dt.timedelta(minutes=29) < row.expires_at - row.created_at <= dt.timedelta(minutes=30)
    finally:
        db.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("qflare.db*"))
    assert not any(t.encode() in raw for t in tokens)
    plain = runner.invoke(
        app, ["token", "create", "--data-dir", str(tmp_path), "--count", "2"], env={"QFLARE_DATABASE_URL": ""}
    )
    assert plain.exit_code == 0 and len(plain.stdout.split()) == 2
    bad = runner.invoke(
        app, ["token", "create", "--data-dir", str(tmp_path), "--expires", "soon"], env={"QFLARE_DATABASE_URL": ""}
    )
    assert bad.exit_code == 2 and "bad_duration" in bad.output


class _FakeContext:
    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.groups: str | None = None

    def set_groups(self, groups: str) -> None:
        if not self.accept:
            raise ssl.SSLError("unknown group")
        self.groups = groups


def test_pq_group_is_preferred_when_the_api_allows() -> None:
    ctx = _FakeContext(accept=True)
    assert prefer_pq_groups(ctx) == "X25519MLKEM768"  # type: ignore[arg-type]
    assert ctx.groups is not None and ctx.groups.split(":")[0] == "X25519MLKEM768"
    assert ctx.groups.split(":") == list(PQ_GROUPS)
    assert prefer_pq_groups(_FakeContext(accept=False)) is None  # type: ignore[arg-type]
    real = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    report = tls_report()
    assert report.openssl == ssl.OPENSSL_VERSION
    assert report.set_groups_api == hasattr(real, "set_groups")
    if not report.set_groups_api:  # e.g. Python 3.11: only set_ecdh_curve, which cannot name the hybrid group
        assert report.pq_group is None
        with pytest.raises(ValueError):
            real.set_ecdh_curve("X25519MLKEM768")
