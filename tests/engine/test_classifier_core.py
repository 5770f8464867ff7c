"""ClassifierCore, the seq_cls engine process's loop: requests that arrive together run in
one encoder pass, each gets exactly what it gets alone, a request whose rows fail its check
fails alone, and a prefix's tensor crosses once (need_prefix when it was forgotten)."""

from __future__ import annotations

import copy

import torch

from server.engine.classifier import ClassifyError, PrefixClassifier
from server.engine.classifier_core import ClassifierCore, Classify
from server.engine.engine_core import DropStale, PrefixPayload, Stop
from server.prefix import ClassifierHead, PrefixRef
from tests.engine.test_classifier import tiny_bert

REF = PrefixRef("acme", "p", "v1")


def setup_core(host_bytes: int = 1 << 30, max_batch_tokens: int = 16384):
    clf = PrefixClassifier(copy.deepcopy(tiny_bert()))
    passes = []
    clf.model.bert.register_forward_hook(lambda m, i, o: passes.append(1))
    return clf, ClassifierCore(clf, host_bytes, max_batch_tokens), passes


def payload(clf, seed: int, plen: int, ref: PrefixRef = REF, head: bool = True) -> PrefixPayload:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(clf.spec.kv_shape(plen), generator=g)
    h = ClassifierHead(torch.randn(3, 32, generator=g), torch.randn(3, generator=g)) if head else None
    return PrefixPayload((ref,), (ref,), kv, h)


def test_requests_that_arrive_together_share_one_pass_and_get_their_solo_results():
    clf, core, passes = setup_core()
    a = payload(clf, 1, 4)
    b = payload(clf, 2, 9, PrefixRef("acme", "q", "v1"))
    cmds = [Classify("r1", [[5, 6, 7], [8, 9]], a), Classify("r2", [[10, 11, 12, 13, 14]], b),
            Classify("r3", [[7, 7]], None)]
    mixed = dict(core.step(cmds).kvs)
    assert len(passes) == 1
    for cmd in cmds:
        _, solo_core, _ = setup_core()
        (rid, solo), = solo_core.step([cmd]).kvs
        assert [torch.allclose(x.logits, y.logits, atol=1e-5) for x, y in zip(mixed[rid], solo)] == [True] * len(solo)
    # the prefix's own head was used: r1's logits are not the base head's
    (_, base), = setup_core()[1].step([Classify("r", [[5, 6, 7]], None)]).kvs
    assert not torch.allclose(mixed["r1"][0].logits, base[0].logits, atol=1e-3)


def test_a_bad_request_fails_alone():
    clf, core, _ = setup_core()
    batch = core.step([Classify("good", [[5, 6]], None), Classify("bad", [[5, 1000]], None)])
    results = dict(batch.kvs)
    assert isinstance(results["bad"], ClassifyError) and "1000" in str(results["bad"])
    assert len(results["good"]) == 1 and results["good"][0].probs.sum().item() > 0.99


def test_large_batches_are_split_by_padded_tokens():
    clf, core, passes = setup_core(max_batch_tokens=12)
    batch = core.step([Classify(f"r{i}", [[5, 6, 7, 8]], None) for i in range(6)])
    assert len(batch.kvs) == 6 and len(passes) == 2  # 3 rows * 4 tokens per pass


def test_a_prefix_crosses_once_and_is_asked_for_again_when_forgotten():
    clf, core, _ = setup_core()
    p = payload(clf, 1, 4)
    core.step([Classify("r1", [[5]], p)])
    without_kv = PrefixPayload(p.key, p.refs, None)
    assert dict(core.step([Classify("r2", [[5]], without_kv)]).kvs)["r2"]
    batch = core.step([DropStale("acme", "p", "v2")])
    assert batch.forgotten == [p.key]
    batch = core.step([Classify("r3", [[5]], without_kv)])
    assert batch.need_prefix == ["r3"] and not batch.kvs
    core.step([Stop()])
    assert core.stopped
