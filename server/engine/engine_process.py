"""serve's engine process: loads the model and runs the loop for its kind on its main thread
(EngineCore around an LLMEngine; ClassifierCore for seq_cls, Seq2SeqCore for seq2seq_lm),
talking to the API process over a pipe (server/engine/async_engine.py is the other end).

Messages are pickled with the plain pickler (tensors copied as bytes, never moved to shared
memory behind our back): commands one per message, one StepBatch per step back. A prefix's
tensor does not travel in the pickle: the API process puts it in a slot of the shared-memory
arena (prefix_arena.py) and the command carries the slot; on receipt this process copies the
slot out into the command (the core sees a plain PrefixPayload with its kv) and answers
SlotsFreed at once, so the slot is free again before the command even runs. A command whose
tensor found no room in the arena carries it in the pickle, as before.
"""

from __future__ import annotations

import logging
import pickle
import signal
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

from server.engine.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineProcessConfig:
    model: str | None  # a local HF folder; None = the embedded SmolLM2
    dtype: str
    device: str
    cache_dir: str | None
    engine: EngineConfig
    host_prefix_bytes: int = 1 << 30  # host copies of prefixes the engine keeps between requests
    # the shared-memory arena that carries prefix tensors to the engine (prefix_arena.py);
    # 0: every tensor goes through the pipe, pickled
    arena_bytes: int = 64 << 20
    log_level: str = "WARNING"


@dataclass
class SlotsFreed:
    """The engine process copied these arena slots out: the API process may reuse them."""

    slot_ids: list[int]


def send(conn: Connection, message: object) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> object:
    return pickle.loads(conn.recv_bytes())


def take_slot(message: object, arena) -> tuple[object, int | None]:
    """(the message with its prefix's tensor copied out of the arena, the slot's id), or
    (the message, None) when it carries no slot."""
    payload = getattr(message, "prefix", None)
    if payload is None or getattr(payload, "slot", None) is None:
        return message, None
    slot = payload.slot
    kv = arena.take(slot) if payload.kv is None else payload.kv
    return replace(message, prefix=replace(payload, kv=kv, slot=None)), slot.id


def main(conn: Connection, config: EngineProcessConfig, arena_name: str | None = None) -> None:
    """The child's entry point (multiprocessing, spawn); `arena_name`: the API process's
    shared-memory arena, None when every tensor comes through the pipe."""
    from pathlib import Path

    from server.engine.engine_core import Died, EngineCore, Ready
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import load_model, model_kind
    from server.engine.prefix_arena import PrefixArena
    from server.prefix import ModelKind

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to serve, which stops us after draining
    arena = None
    try:
        arena = PrefixArena.attach(arena_name) if arena_name is not None else None
        kind = model_kind(config.model) if config.model is not None else ModelKind.CAUSAL_LM
        if kind is ModelKind.SEQ_CLS:
            core = _classifier_core(conn, config)
        elif kind is ModelKind.SEQ2SEQ_LM:
            core = _seq2seq_core(conn, config)
        else:
            loaded = load_model(config.model, config.dtype, config.device,
                                Path(config.cache_dir) if config.cache_dir else None)
            engine = LLMEngine(loaded.model, loaded.tokenizer, config.engine)
            send(conn, Ready(engine.limits, str(engine.dtype).removeprefix("torch."), str(engine.device)))
            core = EngineCore(engine, config.host_prefix_bytes)

        def commands(timeout: float | None) -> list[object]:
            out: list[object] = []
            freed: list[int] = []
            if conn.poll(timeout):
                while True:
                    command, slot_id = take_slot(receive(conn), arena)
                    out.append(command)
                    if slot_id is not None:
                        freed.append(slot_id)
                    if not conn.poll(0):
                        break
            if freed:
                send(conn, SlotsFreed(freed))
            return out

        core.run(commands, lambda batch: send(conn, batch))
    except (EOFError, BrokenPipeError):
        pass  # the API process went away: so do we
    except BaseException as e:  # noqa: BLE001 - tell the API process why, then die
        log.exception("the engine process failed")
        try:
            send(conn, Died(f"{e!r}\n{traceback.format_exc()[-2000:]}"))
        except (OSError, EOFError):
            pass
        raise
    finally:
        if arena is not None:
            arena.close()


def _classifier_core(conn: Connection, config: EngineProcessConfig):
    """A seq_cls model: the classifier loop instead of the decode loop (no KV pool)."""
    from server.engine.classifier_core import ClassifierCore
    from server.engine.engine_core import Ready
    from server.engine.model_loader import load_classifier
    from server.engine.request import EngineLimits

    classifier = load_classifier(config.model, config.dtype, config.device)
    limits = EngineLimits(spec=classifier.spec, vocab_size=classifier.vocab_size, num_blocks=0, block_size=1,
                          has_tokenizer=True)
    send(conn, Ready(limits, str(classifier.dtype).removeprefix("torch."), str(classifier.device)))
    return ClassifierCore(classifier, config.host_prefix_bytes)


def _seq2seq_core(conn: Connection, config: EngineProcessConfig):
    """A seq2seq_lm model (BART, T5): the encoder-decoder loop (no paged KV pool)."""
    from pathlib import Path

    from server.engine.engine_core import Ready
    from server.engine.model_loader import load_seq2seq, load_tokenizer
    from server.engine.seq2seq_core import Seq2SeqCore

    model = load_seq2seq(config.model, config.dtype, config.device)
    core = Seq2SeqCore(model, load_tokenizer(Path(config.model)), config.engine, config.host_prefix_bytes)
    send(conn, Ready(core.limits, str(model.dtype).removeprefix("torch."), str(model.device)))
    return core
