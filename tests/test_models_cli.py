"""`qflare models list/export` on a real coordinator data directory (one trained round), the checks an
export makes before writing (signature, hash, architecture), and `qflare.load_model` on the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from server_fixtures import make_runtime, new_device, train_and_submit
from typer.testing import CliRunner

import qflare
from qflare.cli import app
from qflare.crypto import SigningKey
from qflare.model_file import read_model_info
from qflare.published import ARCHITECTURE_FILE, export_version, list_versions
from qflare.server import create_app
from qflare.storage import BlobStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A coordinator data dir with versions 0 (initial) and 1 (round 1, evaluated); and v1's weights."""
    data_dir = tmp_path_factory.mktemp("coordinator")
    runtime = make_runtime(data_dir, per_round=2, min_devices=2, rounds=2)
    with TestClient(create_app(runtime)) as client:
        devices = [new_device(client) for _ in range(2)]
        for dev in devices:
            dev.enroll(runtime.coordinator.create_tokens(1, ttl_s=600, label="t")[0])
            dev.connect()
        runtime.step()
        for i, dev in enumerate(devices):
            train_and_submit(dev, i, 2)
        assert runtime.evaluator is not None and runtime.evaluator.wait_idle(60)
        flat = runtime.coordinator.rounds.model.flat.clone()
    return data_dir, flat


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_list_shows_every_version_with_lineage_and_metrics(trained_dir: tuple[Path, torch.Tensor]) -> None:
    data_dir, _ = trained_dir
    result = runner.invoke(app, ["models", "list", "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["version"] for r in rows] == [0, 1]
    assert rows[0]["round"] is None and rows[1]["round"] == 1
    assert rows[1]["parent_sha256"] == rows[0]["model_sha256"]
    assert 0.0 <= rows[1]["metrics"]["eval"]["accuracy"] <= 1.0
    assert rows[1]["metrics"]["train_loss"] > 0  # mean of the two devices' reported losses
    assert rows[0]["ledger_seq"] is None  # the initial model closes no round
    assert rows[1]["ledger_seq"] == 1 and len(rows[1]["ledger_entry_sha256"]) == 64  # round 1's ledger entry
    table = runner.invoke(app, ["models", "list", "--data-dir", str(data_dir)])
    assert table.exit_code == 0 and rows[1]["model_sha256"][:10] in table.stdout
    assert f"#1 {rows[1]['ledger_entry_sha256'][:10]}" in table.stdout


def test_a_version_signed_before_a_key_rotation_still_exports(
    trained_dir: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    from qflare.server.rotation import rotate_key

    data_dir = _copy(trained_dir[0], tmp_path / "rotated")
    old_id = (data_dir / "coordinator.keyid").read_text().strip()
    rotate_key(data_dir, reason="test")
    out = tmp_path / "v1.safetensors"
    # signed by the old key; the rotation chain (both signatures per record) vouches for it, and the old
    # key id still names this coordinator
    result = runner.invoke(
        app, ["models", "export", "1", "--data-dir", str(data_dir), "--out", str(out), "--key-id", old_id]
    )
    assert result.exit_code == 0, result.output
    assert old_id[:16] in result.stdout
    wrong = runner.invoke(
        app, ["models", "export", "1", "--data-dir", str(data_dir), "--out", str(out), "--key-id", "ab" * 32]
    )
    assert wrong.exit_code != 0 and "server_key_mismatch" in wrong.output


def test_export_writes_the_signed_model_and_load_model_rebuilds_it(
    trained_dir: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    data_dir, flat = trained_dir
    out = tmp_path / "deep" / "v1.safetensors"
    result = runner.invoke(app, ["models", "export", "latest", "--data-dir", str(data_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote version 1" in result.stdout
    net = qflare.load_model(out)
    assert isinstance(net, torch.nn.Module) and not net.training
    got = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.equal(got, flat)
    info = read_model_info(out)
    assert info.model == "mlp" and info.provenance["version"] == "1" and info.provenance["round"] == "1"
    assert info.provenance["model_sha256"] == list_versions(data_dir)[1].model_hash
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["7"], "unknown_model"),
        (["seven"], "config_error"),
        (["1", "--key-id", "00" * 32], "server_key_mismatch"),
    ],
)
def test_export_refusals(trained_dir: tuple[Path, torch.Tensor], tmp_path: Path, args: list[str], code: str) -> None:
    data_dir, _ = trained_dir
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["models", "export", *args, "--data-dir", str(data_dir), "--out", str(out)])
    assert result.exit_code == 2 and f"[{code}]" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_export_refuses_a_model_signed_by_another_key(trained_dir: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    data_dir = _copy(trained_dir[0], tmp_path / "dir")
    (data_dir / "coordinator.pub").write_text(SigningKey.generate().public.raw.hex() + "\n")
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["models", "export", "1", "--data-dir", str(data_dir), "--out", str(out)])
    assert result.exit_code == 2 and "[bad_signature]" in result.output and not out.exists()


def test_export_refuses_a_tampered_blob(trained_dir: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    data_dir = _copy(trained_dir[0], tmp_path / "dir")
    path = BlobStore(data_dir / "blobs").path_for(list_versions(data_dir)[1].model_hash)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    with pytest.raises(qflare.QflareError) as exc:
        export_version(data_dir, 1, tmp_path / "m.safetensors")
    assert exc.value.code == "blob_corrupt" and not (tmp_path / "m.safetensors").exists()


def test_export_refuses_an_architecture_file_that_does_not_match(
    trained_dir: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    data_dir = _copy(trained_dir[0], tmp_path / "dir")
    doc = json.loads((data_dir / ARCHITECTURE_FILE).read_text())
    (data_dir / ARCHITECTURE_FILE).write_text(json.dumps({**doc, "fingerprint": "ab" * 32}))
    with pytest.raises(qflare.QflareError) as exc:
        export_version(data_dir, 1, tmp_path / "m.safetensors")
    assert exc.value.code == "architecture_mismatch"


@pytest.mark.parametrize("bad", ["nope", "file"])
def test_list_refuses_a_folder_that_is_not_a_coordinator(tmp_path: Path, bad: str) -> None:
    target = tmp_path / bad
    if bad == "file":
        target.write_text("x")
    result = runner.invoke(app, ["models", "list", "--data-dir", str(target)])
    assert result.exit_code == 2 and "[bad_path]" in result.output and "Traceback" not in result.output
