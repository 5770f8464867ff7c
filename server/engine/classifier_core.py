"""The step loop of a seq_cls engine process: classification requests in, one encoder pass
for all of them out (server/engine/classifier.py does the pass).

    loop: take every command that arrived (classify, drop stale prefixes, stop)
          run all the classify requests' rows in one PrefixClassifier.classify call
          (chunked to `max_batch_tokens` padded tokens), mixing their prefixes and heads
          send one StepBatch: each request's results in `kvs`, what was forgotten

It speaks the decode loop's protocol (server/engine/engine_core.py): the same PrefixPayload
(a prefix's tensor crosses once and is kept here, server/engine/prefix_lru.py, within
`host_prefix_bytes` until it is reported forgotten; `need_prefix` asks for it again),
the same StepBatch and Stop.
A request's rows never run half: a row that fails its check fails its whole request, and
the other requests of the pass are run again without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.classifier import ClassifyInput, PrefixClassifier
from server.engine.engine_core import Abort, DropStale, PrefixPayload, StepBatch, Stop
from server.engine.prefix_lru import PrefixLRU
from server.prefix import Prefix

log = logging.getLogger(__name__)


@dataclass
class Classify:
    """Classify each row of token ids after `prefix` (with the prefix's own head, if it has one)."""

    request_id: str
    rows: list[list[int]]
    prefix: PrefixPayload | None


class ClassifierCore:
    def __init__(self, classifier: PrefixClassifier, host_prefix_bytes: int = 1 << 30,
                 max_batch_tokens: int = 16384) -> None:
        self.classifier = classifier
        self.max_batch_tokens = max_batch_tokens
        self.prefixes = PrefixLRU(classifier.spec, host_prefix_bytes)  # host copies
        self.stopped = False

    def run(self, receive: Callable[[float | None], list[object]], send: Callable[[StepBatch], None],
            idle_wait_s: float = 0.5) -> None:
        """Until Stop: each round takes what arrived and answers it in one batch."""
        while not self.stopped:
            batch = self.step(receive(idle_wait_s))
            if batch.kvs or batch.need_prefix or batch.forgotten:
                send(batch)

    def step(self, commands: list[object]) -> StepBatch:
        batch = StepBatch()
        jobs: list[tuple[Classify, Prefix | None]] = []
        for cmd in commands:
            if isinstance(cmd, Classify):
                if cmd.prefix is None:
                    jobs.append((cmd, None))
                elif (prefix := self.prefixes.get(cmd.prefix)) is not None:
                    jobs.append((cmd, prefix))
                else:
                    batch.need_prefix.append(cmd.request_id)
            elif isinstance(cmd, DropStale):
                self.prefixes.forget_stale(cmd.tenant, cmd.prefix_id, cmd.keep_version)
            elif isinstance(cmd, Stop):
                self.stopped = True
            elif not isinstance(cmd, Abort):  # a classification runs in one pass: nothing to abort
                log.warning("the classifier loop ignores %s", type(cmd).__name__)
        for chunk in self._chunks(jobs):
            batch.kvs.extend(self._classify(chunk))
        batch.forgotten = self.prefixes.take_forgotten()
        return batch

    # ---- one pass

    def _chunks(self, jobs):
        """Consecutive groups of whole requests whose rows pad to at most max_batch_tokens
        (a request larger than that runs alone)."""
        group, rows, width = [], 0, 0
        for cmd, prefix in jobs:
            p = 0 if prefix is None else prefix.length
            w = max(width, p + max((len(r) for r in cmd.rows), default=0))
            if group and (rows + len(cmd.rows)) * w > self.max_batch_tokens:
                yield group
                group, rows, w = [], 0, p + max((len(r) for r in cmd.rows), default=0)
            group.append((cmd, prefix))
            rows, width = rows + len(cmd.rows), w
        if group:
            yield group

    def _classify(self, jobs) -> list[tuple[str, object]]:
        inputs = [ClassifyInput(row, prefix) for cmd, prefix in jobs for row in cmd.rows]
        try:
            results = self.classifier.classify(inputs)
        except Exception as e:  # noqa: BLE001 - find whose rows failed, answer the rest
            if len(jobs) == 1:
                return [(jobs[0][0].request_id, e)]
            return [answer for job in jobs for answer in self._classify([job])]
        out, at = [], 0
        for cmd, _ in jobs:
            out.append((cmd.request_id, results[at:at + len(cmd.rows)]))
            at += len(cmd.rows)
        return out
