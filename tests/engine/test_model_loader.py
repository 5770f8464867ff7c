"""The first-start conversion of the embedded model, with several processes starting at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from server.engine import model_loader


def test_concurrent_first_starts_convert_once_and_never_see_a_partial_folder(tmp_path, monkeypatch):
    calls = []

    def slow_convert(target: Path) -> None:  # writes the folder the way the real one does
        calls.append(threading.get_ident())
        tmp = target.with_name(target.name + f".tmp{threading.get_ident()}")
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        time.sleep(0.3)  # the others arrive while this one converts
        (tmp / "model.safetensors").write_bytes(b"weights")
        tmp.rename(target)

    monkeypatch.setattr(model_loader, "_convert_default_model", slow_convert)
    seen: list[tuple[Path, bool]] = []

    def start() -> None:
        path = model_loader.ensure_default_model(tmp_path)
        seen.append((path, (path / "model.safetensors").read_bytes() == b"weights"))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    assert seen == [(tmp_path / "models" / model_loader.DEFAULT_MODEL_NAME, True)] * 4
