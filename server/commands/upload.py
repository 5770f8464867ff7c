"""`prefix-serve upload ID PATH`: send a prefix to a running server.

PATH is a PEFT prefix-tuning adapter folder (zipped on the fly: adapter_config.json and
adapter_model.safetensors only), a zip of one, or a .safetensors file with `prefix_kv` or
`prompt_embeddings`.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import httpx

from server.commands._client import add_client_arguments, client, client_settings, fail, unreachable

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix_id", metavar="ID", help="the prefix id to create or replace")
    parser.add_argument("path", metavar="PATH", type=Path, help="adapter folder, .zip or .safetensors file")
    parser.add_argument("--description", default="", help="a note stored with the prefix")
    parser.add_argument("--num-virtual-tokens", type=int, default=None,
                        help="rows of prompt_embeddings (checked if given)")
    parser.add_argument("--shared", action="store_true",
                        help="admin key only: every tenant may use the prefix as shared/<ID>")
    add_client_arguments(parser)


def payload(path: Path) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) to send for PATH."""
    if path.is_dir():
        missing = [n for n in ADAPTER_FILES if not (path / n).exists()]
        if missing:
            hint = " (adapter_model.bin is a pickle and is refused: save with safetensors)" \
                if (path / "adapter_model.bin").exists() else ""
            raise SystemExit(f"prefix-serve: {path} lacks {', '.join(missing)}{hint}")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in ADAPTER_FILES:
                zf.write(path / name, name)
        return f"{path.name or 'adapter'}.zip", buf.getvalue(), "application/zip"
    if not path.exists():
        raise SystemExit(f"prefix-serve: {path} does not exist")
    kind = "application/zip" if path.suffix == ".zip" else "application/octet-stream"
    return path.name, path.read_bytes(), kind


def run(args: argparse.Namespace) -> int:
    name, data, kind = payload(args.path)
    form = {"description": args.description, "shared": "true" if args.shared else "false"}
    if args.num_virtual_tokens is not None:
        form["num_virtual_tokens"] = str(args.num_virtual_tokens)
    try:
        with client(args) as c:
            r = c.put(f"/v1/prefixes/{args.prefix_id}", files={"file": (name, data, kind)}, data=form)
    except httpx.TransportError as e:
        return unreachable(client_settings(args).url, e)
    if r.status_code not in (200, 201):
        return fail(r, f"upload of {args.prefix_id}")
    print(json.dumps({"status": "created" if r.status_code == 201 else "replaced", **r.json()}, indent=2))
    return 0
