"""docker/ checked statically (no Docker engine here): the compose file, the Prometheus,
Grafana and HAProxy configs parse and agree with each other, and name only images, ports
and files that exist in the repository or are pinned public images."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
# Public images the stack may pull, each with a pinned tag (never `latest`).
PUBLIC_IMAGE = re.compile(r"^(redis|haproxy|prom/prometheus|grafana/grafana):v?[0-9][\w.-]*$")
# Ports the public images listen on by default.
IMAGE_PORTS = {"prom/prometheus": 9090, "grafana/grafana": 3000, "redis": 6379}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def replicas(services: dict) -> dict[str, dict]:
    """The server replicas: services running `prefix-serve serve`."""
    return {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}


def server_port(service: dict) -> int:
    return int(service["environment"]["PREFIX_SERVE_PORT"])


def metrics_port(service: dict) -> int:
    """Replicas serve /metrics on their own port, inside the compose network only."""
    assert service["environment"]["PREFIX_SERVE_METRICS_HOST"] == "0.0.0.0"
    return int(service["environment"]["PREFIX_SERVE_METRICS_PORT"])


def container_port(mapping: str) -> int:
    return int(str(mapping).split(":")[-1].split("/")[0])


def haproxy_cfg() -> str:
    return (DOCKER / "haproxy" / "haproxy.cfg").read_text()


def test_compose_has_the_whole_stack(services):
    assert set(services) >= {"redis", "server-1", "server-2", "worker", "lb", "prometheus", "grafana"}
    assert len(replicas(services)) == 2
    assert services["worker"]["command"] == ["worker"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    for name in [*replicas(services), "worker"]:
        env = services[name]["environment"]
        assert env["PREFIX_SERVE_REDIS_URL"] == "redis://redis:6379/0", name  # one shared Redis
        assert "PREFIX_SERVE_ADMIN_KEY" in env, name  # required on a non-loopback address


def test_images_are_built_here_or_pinned_public_images(services):
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
            assert service["image"].startswith("prefix-serve:"), name
        else:
            assert PUBLIC_IMAGE.match(service["image"]), f"{name}: image {service['image']!r} is not a pinned public image"


def test_mounted_files_exist(services):
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is not in docker/"


def test_commands_are_prefix_serve_subcommands(services):
    for name, service in services.items():
        if "build" in service:
            sub = service["command"][0]
            assert sub in COMMANDS, f"{name}: `prefix-serve {sub}` is not a command"
            if not (REPO / "server" / "commands" / f"{sub}.py").exists():
                pytest.skip(f"server/commands/{sub}.py (used by service {name}) does not exist yet")


def test_published_ports_are_ports_the_services_listen_on(services):
    assert [container_port(p) for p in services["lb"]["ports"]] == [int(re.search(r"bind :(\d+)", haproxy_cfg())[1])]
    for name in ("prometheus", "grafana"):
        image = services[name]["image"].split(":")[0]
        assert [container_port(p) for p in services[name]["ports"]] == [IMAGE_PORTS[image]], name
    for name, service in replicas(services).items():
        assert [int(p) for p in service["expose"]] == [server_port(service), metrics_port(service)], name
        assert "ports" not in service, f"{name}: replicas are reached through the load balancer"


def test_prometheus_scrapes_every_replica_and_the_worker(services):
    path = DOCKER / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    want = {f"{n}:{metrics_port(s)}" for n, s in replicas(services).items()}
    want.add(f"worker:{services['worker']['environment']['PREFIX_SERVE_METRICS_PORT']}")
    assert targets == want
    assert [int(p) for p in services["worker"]["expose"]] == [int(services["worker"]["environment"]["PREFIX_SERVE_METRICS_PORT"])]
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package ships it
        check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_haproxy_routes_by_prefix_with_consistent_hashing(services):
    cfg = haproxy_cfg()
    servers = dict(re.findall(r"^\s*server\s+\S+\s+([\w.-]+):(\d+)", cfg, re.M))
    assert {h: int(p) for h, p in servers.items()} == {n: server_port(s) for n, s in replicas(services).items()}
    assert re.search(r"^\s*balance hash var\(txn\.affinity\)", cfg, re.M)
    assert re.search(r"^\s*hash-type consistent", cfg, re.M)
    assert "option http-buffer-request" in cfg
    assert "json_query('$.prefix_id')" in cfg and "json_query('$.model')" in cfg
    assert re.search(r"^\s*option httpchk GET /health", cfg, re.M)
    assert re.search(r"^\s*option redispatch", cfg, re.M)
    assert services["lb"]["volumes"] == ["./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if haproxy:  # its own check; the compose host names do not resolve here, which it allows
        check = subprocess.run([haproxy, "-c", "-f", str(DOCKER / "haproxy" / "haproxy.cfg")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_provisions_the_datasource_and_dashboard(services):
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == f"http://prometheus:{IMAGE_PORTS['prom/prometheus']}"
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/dashboards.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./grafana/dashboards"]]
    dashboard = json.loads((DOCKER / "grafana/dashboards/prefix-serve.json").read_text())
    uids = set()

    def walk(node):
        if isinstance(node, dict):
            if "datasource" in node and isinstance(node["datasource"], dict):
                uids.add(node["datasource"]["uid"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert uids == {ds["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == mounts["./grafana/dashboards"] + "/prefix-serve.json"


def test_dockerfile_defaults_and_copies(services):
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert 'ENTRYPOINT ["prefix-serve"]' in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in line.split():
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the build context"
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    for name, service in gpu["services"].items():
        assert name in services, name
        assert service["build"]["args"]["BASE_IMAGE"].endswith("nvidia/cuda:12.4.1-runtime-ubuntu22.04}")
