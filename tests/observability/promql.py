"""The metric names a PromQL expression reads, and the scrape-side helpers the tests share.

A small tokenizer, not a parser: it drops string literals, label matchers `{...}`, range
and subquery brackets `[...]`, Grafana variables and the label lists of `by`/`without`/
`on`/`ignoring`/`group_*`, then keeps every identifier that is not a function call, a
keyword or a number. That covers the expressions a dashboard uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("1m", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group()
        before = text[m.start() - 1] if m.start() > 0 else " "
        after = text[m.end():].lstrip()[:1]
        if after == "(" or word.lower() in _KEYWORDS or before.isdigit() or before == ".":
            continue  # a function, a keyword, or the unit of a duration/number (1m, 1e3)
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, expr) for every panel target (nested rows included) and query variable."""
    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield f"panel {p.get('title')!r}", t["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and query:
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            yield f"variable {var['name']!r}", m.group(1) if m else query


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] of a live /metrics page."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 if none)."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))
