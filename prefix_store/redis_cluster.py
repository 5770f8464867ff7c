"""A real Redis Cluster that we start and own (tests, bench/cluster_bench.py): three masters,
each with one replica, six redis-server processes on 127.0.0.1 (no password: loopback only),
formed with `redis-cli --cluster create`.

A short `cluster-node-timeout` makes a killed master's replica take over within a few
seconds, so failover tests stay short. `master_of(key).kill()` SIGKILLs the master of a
key's slot; `restart(node)` brings a killed node back (it rejoins as a replica of the
promoted one).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from prefix_store.redis_process import free_port

NODE_TIMEOUT_MS = 1000


class NodeProcess:
    def __init__(self, port: int, bus_port: int, datadir: Path):
        self.port = port
        self.bus_port = bus_port  # its own: the default port + 10000 may be taken, or above 65535
        self.datadir = datadir
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server not found on PATH")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
             "--dir", str(self.datadir), "--logfile", str(self.datadir / "redis.log"), "--daemonize", "no",
             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
             "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port), "--cluster-config-file", str(self.datadir / "nodes.conf"),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             # a replica whose master was away a while may still be promoted (the default
             # factor 10 x node timeout would refuse it in a slow test run)
             "--cluster-replica-validity-factor", "0",
             # replicas sync at once (the default waits 5 s for more replicas to share a transfer)
             "--repl-diskless-sync-delay", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                try:
                    if c.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {self.address} did not start:\n{self.log_tail()}")
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join((self.datadir / "redis.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class RedisClusterProcesses:
    """Usage: `with RedisClusterProcesses() as c: PrefixStore(c.url)`."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 1):
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.root = Path(tempfile.mkdtemp(prefix="prefix-serve-cluster-"))
        self.nodes = [NodeProcess(free_port(), free_port(), self.root / f"node-{i}")
                      for i in range(masters * (1 + replicas_per_master))]

    @property
    def url(self) -> str:
        """The url PrefixStore and JobQueue take: every node as a seed."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def start(self, timeout: float = 30.0) -> "RedisClusterProcesses":
        try:
            return self._start(timeout)
        except BaseException:
            self.close()  # no node outlives a failed start
            raise

    def _start(self, timeout: float) -> "RedisClusterProcesses":
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self._wait_up(node)
        out = subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
                              "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_healthy(timeout)
        return self

    @staticmethod
    def _wait_up(node: NodeProcess, attempts: int = 3) -> None:
        """Wait for a node to answer. A port that another process's socket took between
        free_port() and the node's bind is not an error: before the cluster is formed, the
        node starts again on new ports."""
        for attempt in range(attempts):
            try:
                node.wait_up()
                return
            except RuntimeError:
                if attempt == attempts - 1 or "Address already in use" not in node.log_tail():
                    raise
            node.kill()
            node.port, node.bus_port = free_port(), free_port()
            node.start()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says cluster_state:ok, and there are `masters` masters each with its
        replicas in sync (state online: WAIT counts only those)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become healthy:\n" + self.describe())
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            for node in self.live_nodes():
                with node.client() as c:
                    if c.cluster("info").get("cluster_state") != "ok":
                        return False
            masters = [n for n in self.live_nodes() if self.role(n) == "master"]
            if len(masters) != self.masters:
                return False
            for m in masters:
                with m.client() as c:
                    info = c.info("replication")
                online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                          and v.get("state") == "online"]
                if len(online) < self.replicas_per_master:
                    return False
            return True
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False

    def live_nodes(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def role(self, node: NodeProcess) -> str:
        with node.client() as c:
            return c.info("replication")["role"]

    def master_of(self, key: str) -> NodeProcess:
        """The live node that, by its own account, serves `key`'s slot as master."""
        for node in self.live_nodes():
            try:
                with node.client() as c:
                    if c.info("replication")["role"] != "master":
                        continue
                    if _owner_port(c, c.cluster("keyslot", key)) == node.port:
                        return node
            except (redis.ConnectionError, redis.TimeoutError):
                continue
        raise RuntimeError(f"no live master for {key!r}:\n{self.describe()}")

    def slots_of(self, master: NodeProcess) -> list[tuple[int, int]]:
        """The slot ranges `master` serves, by its own account."""
        with master.client() as c:
            return [(start, end) for start, end, owner, *_ in c.execute_command("CLUSTER", "SLOTS")
                    if int(owner[1]) == master.port]

    def replica_of(self, master: NodeProcess) -> NodeProcess:
        for node in self.live_nodes():
            with node.client() as c:
                info = c.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                return node
        raise RuntimeError(f"{master.address} has no replica:\n{self.describe()}")

    def wait_promoted(self, key: str, old: NodeProcess, timeout: float = 30.0) -> NodeProcess:
        """Wait until a live node other than `old` is master of `key`'s slot (cluster ok again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                node = self.master_of(key)
                with node.client() as c:
                    if node is not old and c.cluster("info").get("cluster_state") == "ok":
                        return node
            except RuntimeError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no replica was promoted for {key!r}:\n{self.describe()}")

    def restart(self, node: NodeProcess) -> None:
        node.start()
        node.wait_up()

    def describe(self) -> str:
        lines = []
        for node in self.nodes:
            alive = node.proc is not None and node.proc.poll() is None
            state = "dead"
            if alive:
                try:
                    with node.client() as c:
                        state = f"{self.role(node)} {c.cluster('info').get('cluster_state')}"
                except (redis.ConnectionError, redis.TimeoutError):
                    state = "unreachable"
            lines.append(f"{node.address}: {state}")
        return "\n".join(lines)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "RedisClusterProcesses":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _owner_port(client: redis.Redis, slot: int) -> int | None:
    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(master[1])
    return None
