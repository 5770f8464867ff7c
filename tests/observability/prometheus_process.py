"""A real Prometheus (Debian's /usr/bin/prometheus) on loopback, scraping given targets
every second, with its data in a temporary directory."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from prefix_store.redis_process import free_port
from tests.processes import START_BOUND_S, log_tail, stop_process


class PrometheusServer:
    def __init__(self, targets: list[str], scrape_interval: str = "1s") -> None:
        self.exe = shutil.which("prometheus")
        if self.exe is None:
            raise FileNotFoundError("the prometheus binary is not installed (apt-get install prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="prefix-serve-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
                  "scrape_configs": [{"job_name": "prefix-serve", "metrics_path": "/metrics",
                                      "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_BOUND_S) -> "PrometheusServer":
        log = open(self.dir / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [self.exe, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query; a PromQL error fails the test with its message."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        """The single value of `expr`, NaN when it has no (or no finite) result yet."""
        result = self.query(expr)
        if len(result) != 1:
            return math.nan
        return float(result[0]["value"][1])

    def log_tail(self, n: int = 20) -> str:
        return log_tail(self.dir / "prometheus.log", n)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, 15)
        shutil.rmtree(self.dir, ignore_errors=True)
