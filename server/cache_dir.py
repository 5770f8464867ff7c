"""Where prefix-serve keeps what it makes on a machine: converted models, the Redis data of
the server it starts, the generated admin key. Standard library only (client commands
import it without torch)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """PREFIX_SERVE_CACHE_DIR, else ~/.cache/prefix-serve."""
    return Path(os.environ.get("PREFIX_SERVE_CACHE_DIR", Path.home() / ".cache" / "prefix-serve"))
