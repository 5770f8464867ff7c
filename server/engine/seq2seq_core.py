"""The step loop of a seq2seq_lm engine process (BART, T5): continuous batching over
PrefixSeq2Seq (server/engine/seq2seq.py), requests with different prefixes in one decoder
forward per step.

    loop: apply the commands that arrived (add, abort, drop stale prefixes, stop)
          admit waiting requests while the token budget has room: one encoder pass for all
            of them, then each one's cross-attention keys and values (its prefill, once)
          one decoder step for every running request: sample (structured output: only what
            its pattern allows, guided_decoding.py; the pattern compiles off the loop first),
            stop at EOS or max_tokens, detokenize, stop strings
          send one StepBatch: every output of the step, the stats, what was forgotten

It speaks the decode loop's protocol (server/engine/engine_core.py): AddRequest, Abort,
DropStale and Stop in, StepBatch out; a prefix's tensor crosses once and is kept in a host
LRU (prefix_lru.py) until it is reported forgotten (`need_prefix` asks for it again).

# NOTE: memory. A request's state is its own plain tensors (DecoderState), NOT blocks of a
# paged KV pool: its cross-attention kv over its S encoder tokens, and self-attention slots
# for its prefix P (a copy per request, not shared) and its max_tokens decoder tokens. At
# admission it reserves all S + P + max_tokens token slots of the budget (`budget`, from
# EngineConfig: num_blocks * block_size, else kv_cache_bytes over the bytes of one slot), so a
# running request never needs more and nothing is preempted or recomputed. A request that
# does not fit waits until finished requests give their slots back; one that can never fit is
# refused at add.
#
# NOTE: fairness. Waiting requests queue per tenant (WaitingQueues, as in scheduler.py) and
# the slots that come back go to the backlogged tenant with the smallest virtual token
# counter (fairness.py: encoder tokens at admission, one token per row per decoder step),
# oldest request first among equals. If that tenant's oldest request does not fit, nobody
# overtakes it (a large request is not starved by small ones). A running request is never
# preempted, so fairness acts at admission only.
# The encoder output itself is dropped once the cross kv is computed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from server.engine.config import EngineConfig
from server.engine.detokenizer import Detokenizer, emittable, find_stop
from server.engine.engine_core import AddRequest, Abort, ComputeKV, DropStale, StepBatch, Stop
from server.engine.fairness import VirtualTokenCounter
from server.engine.guided_decoding import GuideCompiler, PendingCompiles, advance_guides, mask_logits
from server.engine.logprobs import token_logprobs
from server.engine.outputs import EngineStats, FinishReason, RequestOutput
from server.engine.prefix_lru import PrefixLRU
from server.engine.request import EngineLimits, Request, RequestError, RequestStatus, check_request
from server.engine.sampler import sample
from server.engine.scheduler import WaitingQueues
from server.engine.seq2seq import DecodeBatch, DecoderState, PrefixSeq2Seq

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    req: Request  # what is generated so far: tokens, text, logprobs, finish reason
    stream: bool  # False: one output, when it finishes
    slots: int  # token slots of the budget it holds while running: S + P + max_tokens
    prefix_key: tuple | None
    state: DecoderState | None = None  # while running
    next_token: int = 0  # the decoder input of its next step

    @property
    def tenant(self) -> str:  # WaitingQueues' key
        return self.req.tenant


class Seq2SeqCore:
    def __init__(self, model: PrefixSeq2Seq, tokenizer=None, config: EngineConfig | None = None,
                 host_prefix_bytes: int = 1 << 30) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        spec = model.spec
        slot_bytes = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * torch.finfo(model.dtype).bits // 8
        self.budget = (config.num_blocks * config.block_size if config.num_blocks is not None
                       else max(1, config.kv_cache_bytes // slot_bytes))  # token slots
        self.limits = EngineLimits(spec=spec, vocab_size=model.vocab_size, num_blocks=self.budget, block_size=1,
                                   has_tokenizer=tokenizer is not None, max_num_seqs=config.max_num_seqs)
        self.detokenizer = Detokenizer(tokenizer)
        self.guides = GuideCompiler.for_engine(tokenizer, model.eos_token_ids, config.guide_compile_timeout_s)
        self._compiling = PendingCompiles(self.guides)  # structured output: patterns compiling off the loop
        self.prefixes = PrefixLRU(spec, host_prefix_bytes)
        self.waiting = WaitingQueues()  # of _Row, one FIFO per tenant
        self.vtc = VirtualTokenCounter()
        self.running: list[_Row] = []
        self.reserved = 0  # token slots the running requests hold
        self._decode: DecodeBatch | None = None  # the running rows' padded cross kv, until they change
        self._batch = StepBatch()
        self._added_through = 0
        self._stats = EngineStats(kv_blocks_total=self.budget)
        self.stopped = False

    # ---- commands

    def apply(self, commands: Iterable[object]) -> None:
        for cmd in commands:
            if isinstance(cmd, AddRequest):
                self._add(cmd)
            elif isinstance(cmd, Abort):
                self._compiling.discard(cmd.request_id)
                self._abort(cmd.request_id)
            elif isinstance(cmd, DropStale):
                self.prefixes.forget_stale(cmd.tenant, cmd.prefix_id, cmd.keep_version, self._pinned())
            elif isinstance(cmd, ComputeKV):
                self._batch.kvs.append((cmd.request_id, RequestError(
                    "a prompt prefix (keys and values of a text) needs a causal_lm model")))
            elif isinstance(cmd, Stop):
                self.stopped = True
            else:
                log.warning("the seq2seq loop ignores %s", type(cmd).__name__)

    def _add(self, cmd: AddRequest) -> None:
        self._added_through = max(self._added_through, cmd.seq)
        if self._compiling.defer(cmd):
            return
        prefix = None
        if cmd.prefix is not None:
            prefix = self.prefixes.get(cmd.prefix, self._pinned())
            if prefix is None:  # forgotten here: the API sends the command again, with the tensor
                self._batch.need_prefix.append(cmd.request_id)
                return
        try:
            if any(r.req.request_id == cmd.request_id for r in (*self.waiting, *self.running)):
                raise RequestError(f"request id {cmd.request_id!r} is already in use")
            check_request(self.limits, cmd.prompt_token_ids, cmd.sampling, prefix)
            prompt = [int(t) for t in cmd.prompt_token_ids]
            samples = [Request(cmd.request_id, prompt, cmd.sampling, prefix, cmd.arrival_time, cmd.tenant, index=i)
                       for i in range(cmd.sampling.n)]
            if cmd.sampling.guided_regex is not None:  # compiled already (cached): raises the GuideError it gave
                for req in samples:
                    req.guide = self.guides.guide(cmd.sampling.guided_regex)
        except Exception as e:  # noqa: BLE001 - the caller learns why; the loop goes on
            self._batch.rejected.append((cmd.request_id, e))
            return
        cross = 0 if prefix is None else prefix.cross_length
        slots = len(prompt) + cross + samples[0].prefix_len + cmd.sampling.max_tokens  # each sample's
        key = None if cmd.prefix is None else cmd.prefix.key
        tenant = cmd.tenant
        if not self.waiting.count(tenant) and not any(r.tenant == tenant for r in self.running):
            self.vtc.join(tenant, self._backlogged())
        for req in samples:  # n > 1: a row per sample; those admitted together share one encoder pass
            self.waiting.append(_Row(req, cmd.stream, slots, key))

    def _backlogged(self) -> set[str]:
        return set(self.waiting.tenants()) | {r.tenant for r in self.running}

    def _abort(self, request_id: str) -> None:
        for row in [r for r in self.waiting if r.req.request_id == request_id]:
            self.waiting.remove(row)
            self._release(row)
        for row in [r for r in self.running if r.req.request_id == request_id]:
            self._end(row, FinishReason.ABORT)
            self.running.remove(row)
            self._decode = None

    # ---- the step

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> StepBatch:
        """Admit what fits, run one decoder step (if anything runs) and return what to send."""
        self._compiling.drain(self._add, lambda request_id, e: self._batch.rejected.append((request_id, e)))
        self._admit()
        if self.running:
            self._decode_step()
        batch, self._batch = self._batch, StepBatch()
        batch.forgotten.extend(self.prefixes.take_forgotten())
        batch.stats = self.stats()
        batch.added_through = self._added_through
        return batch

    def _admit(self) -> None:
        """Waiting requests, the least served tenant's oldest first, while the budget,
        max_num_seqs and (for the encoder pass) max_num_batched_tokens allow: their encoder
        pass and cross kv."""
        new: list[_Row] = []
        encoding: dict[str, _Row] = {}  # request id -> its first row admitted now: one encoder row per request
        tokens = 0
        while self.waiting and len(self.running) + len(new) < self.config.max_num_seqs:
            tenant = min(self.waiting.tenants(), key=lambda t: (self.vtc[t], self.waiting.of(t)[0].req.arrival_time))
            row = self.waiting.of(tenant)[0]
            n = 0 if row.req.request_id in encoding else len(row.req.prompt_token_ids)
            if self.reserved + row.slots > self.budget or (new and tokens + n > self.config.max_num_batched_tokens):
                break  # no overtaking: it is next when slots come back
            self.waiting.popleft(tenant)
            self.vtc.charge(tenant, n)
            self.reserved += row.slots
            new.append(row)
            encoding.setdefault(row.req.request_id, row)
            tokens += n
        if not new:
            return
        model = self.model
        try:
            first = list(encoding.values())
            parts = [r.req.prefix for r in first]
            encoded = model.encode_rows([torch.tensor(r.req.prompt_token_ids) for r in first],
                                        [None if p is None else p.encoder_kv for p in parts])
            cross = {r.req.request_id: model.cross_kv(hidden, None if p is None else p.cross_kv)
                     for r, hidden, p in zip(first, encoded, parts)}
            for row in new:  # the samples of a request share its cross kv tensor
                row.state = model.decoder_state(cross[row.req.request_id], row.req.prefix, row.req.sampling.max_tokens)
        except Exception as e:  # noqa: BLE001 - these requests fail; the running ones go on
            log.exception("the encoder pass of %d requests failed", len(new))
            for row in new:
                self._fail(row, f"the encoder pass failed ({type(e).__name__}: {e})")
            return
        for row in new:
            row.req.status = RequestStatus.RUNNING
            row.next_token = model.decoder_start_token_id
        self.running += new
        self._decode = None
        self._stats.prompt_tokens += tokens

    def _decode_step(self) -> None:
        rows = self.running
        try:
            if self._decode is None:
                self._decode = self.model.decode_batch([r.state for r in rows])
            logits = self.model.decode_step(self._decode, [r.next_token for r in rows])
            guided = [i for i, r in enumerate(rows) if r.req.guide is not None]
            guides = [rows[i].req.guide for i in guided]
            masked = mask_logits(logits, guided, guides) if guided else logits  # logprobs stay the raw ones
            tokens: list = sample(masked, [r.req.sampling for r in rows], [len(r.req.output_token_ids) for r in rows],
                                  [r.req.index for r in rows])
            advance_guides(tokens, guided, guides, self.model.eos_token_ids)
            asked = [i for i, r in enumerate(rows) if r.req.sampling.logprobs is not None]
            if asked:
                found = token_logprobs(logits[asked], [tokens[i] for i in asked],
                                       [rows[i].req.sampling.logprobs for i in asked])
                for i, lp in zip(asked, found):
                    rows[i].req.logprobs.append(lp)
                    rows[i].req.cumulative_logprob += lp.logprob
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep the loop
            log.exception("a decoder step of %d requests failed", len(rows))
            for row in rows:
                self._fail(row, f"the model step failed ({type(e).__name__}: {e})")
            self.running, self._decode = [], None
            return
        now = time.monotonic()
        eos = self.model.eos_token_ids
        for row, token in zip(rows, tokens):
            req = row.req
            if isinstance(token, Exception):  # its pattern could not take the token: it fails alone
                self._fail(row, f"structured output: {type(token).__name__}: {token}")
                continue
            req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            row.next_token = token
            reason = (FinishReason.STOP if token in eos and not req.sampling.ignore_eos else
                      FinishReason.LENGTH if len(req.output_token_ids) >= req.sampling.max_tokens else None)
            try:
                reason = self._update_text(req) or reason
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("request %s failed in the step", req.request_id)
                self._fail(row, f"{type(e).__name__}: {e}")
                continue
            if reason is not None:
                self._end(row, reason)
            elif row.stream:
                self._emit(req)
        for row in rows:
            self.vtc.charge(row.tenant, 1)
        s = self._stats
        s.steps += 1
        s.generated_tokens += len(rows)
        s.last_step_tokens = s.last_step_requests = len(rows)
        s.scheduled_tokens += len(rows)
        s.scheduled_requests += len(rows)
        if any(r.req.is_finished for r in rows):
            self.running = [r for r in rows if not r.req.is_finished]
            self._decode = None

    def _update_text(self, req: Request) -> FinishReason | None:
        """Detokenize the new token; STOP if a stop string showed up (the text is cut there)."""
        old_len = len(req.output_text)
        self.detokenizer.update(req)
        cut = find_stop(req.output_text, req.sampling.stop, len(req.output_text) - old_len)
        if cut is None:
            return None
        req.output_text = req.output_text[:cut]
        return FinishReason.STOP

    # ---- ending a request

    def _end(self, row: _Row, reason: FinishReason) -> None:
        """Finish a running request: its state and slots are freed now; its last output is
        sent unless it was aborted (its caller is gone)."""
        row.req.status, row.req.finish_reason = RequestStatus.FINISHED, reason
        row.state = None
        self.reserved -= row.slots
        self._release(row)
        if reason is not FinishReason.ABORT:
            self._emit(row.req)

    def _fail(self, row: _Row, message: str) -> None:
        row.req.error = message
        self._end(row, FinishReason.ERROR)

    def _pinned(self) -> set[tuple]:
        """The prefixes of the queued and running requests: host copies eviction keeps."""
        return {r.prefix_key for r in (*self.waiting, *self.running) if r.prefix_key is not None}

    def _release(self, row: _Row) -> None:
        row.prefix_key = None  # no longer pinned in the host copies

    def _emit(self, req: Request) -> None:
        finished = req.is_finished
        new_ids = req.output_token_ids[req.num_tokens_emitted:]
        upto = emittable(req.output_text, req.sampling.stop, finished)
        text = req.output_text[req.num_text_emitted:upto] if upto > req.num_text_emitted else ""
        req.num_tokens_emitted, req.num_text_emitted = len(req.output_token_ids), max(req.num_text_emitted, upto)
        out = RequestOutput(request_id=req.request_id, new_token_ids=new_ids, new_text=text, finished=finished,
                            finish_reason=req.finish_reason, num_prompt_tokens=len(req.prompt_token_ids),
                            num_output_tokens=len(req.output_token_ids), first_token_time=req.first_token_time,
                            arrival_time=req.arrival_time, error=req.error, index=req.index)
        if req.sampling.logprobs is not None:
            out.logprobs = req.logprobs[req.num_logprobs_emitted:]
            out.cumulative_logprob = req.cumulative_logprob
            req.num_logprobs_emitted = len(req.logprobs)
        self._batch.outputs.append(out)

    # ---- stats and the loop

    def stats(self) -> EngineStats:
        """A snapshot; the budget's token slots are reported as KV blocks of one token."""
        s = self._stats
        waiting: dict[str, int] = {}
        for row in self.waiting:
            waiting[row.req.tenant] = waiting.get(row.req.tenant, 0) + 1
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting), waiting_by_tenant=waiting,
                           kv_blocks_total=self.budget, kv_blocks_free=self.budget - self.reserved,
                           prefixes_resident=len(self.prefixes), prefixes_resident_bytes=self.prefixes.nbytes,
                           steps=s.steps, prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
                           last_step_tokens=s.last_step_tokens, last_step_requests=s.last_step_requests,
                           scheduled_tokens=s.scheduled_tokens, scheduled_requests=s.scheduled_requests)

    def run(self, receive: Callable[[float | None], list[object]], send: Callable[[StepBatch], None],
            idle_wait_s: float = 0.5) -> None:
        """Until Stop: commands in, one batch out per step (EngineCore.run's contract)."""
        while not self.stopped:
            busy = self.has_unfinished()
            self.apply(receive(0.0 if busy else 0.005 if self._compiling else idle_wait_s))
            if self.stopped:
                break
            batch = self.step()
            if busy or batch.outputs or batch.rejected or batch.need_prefix or batch.forgotten or batch.kvs:
                send(batch)
        self._compiling.shutdown()
