"""The engine: one frozen LM, continuous batching over requests with mixed prefixes.

    step() = scheduler.schedule() -> model_runner.run() -> sample -> scheduler.postprocess()
             -> outputs (detokenized text, stop strings)

References: Li & Liang 2021 (prefix-tuning); Yu et al. 2022 (Orca, iteration-level
scheduling); Kwon et al. 2023 (vLLM, paged KV). Plain Python + torch: no HTTP, Redis or
Prometheus here.
"""

from __future__ import annotations

import logging
import time

import torch

from server.engine.config import EngineConfig
from server.engine.detokenizer import Detokenizer, emittable, find_stop
from server.engine.guided_decoding import GuideCompiler, advance_guides, mask_logits
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.logprobs import token_logprobs
from server.engine.model_runner import ModelRunner, StepLogits
from server.engine.outputs import EngineStats, FinishReason, RequestOutput
from server.engine.request import EngineLimits, Request, RequestError, RequestStatus, check_request
from server.engine.sampler import sample
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.prefix import ModelSpec, Prefix, PrefixRef

log = logging.getLogger(__name__)


class KVPoolBusy(RuntimeError):
    """Work outside the step loop found no free blocks (running requests hold them)."""


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        model.eval().requires_grad_(False)
        self.model = model
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // ModelRunner.block_bytes(model, config.block_size))
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.spec = ModelSpec.from_hf(model, config.max_model_len)
        self.kv = KVCacheManager(num_blocks, config.block_size, self.runner.write_prefix, self.runner.copy_block)
        self.scheduler = Scheduler(config, self.kv)
        self.detokenizer = Detokenizer(tokenizer)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.guides = GuideCompiler.for_engine(tokenizer, self.eos_token_ids, config.guide_compile_timeout_s)
        self.requests: dict[str, list[Request]] = {}  # request id -> its samples (n of them)
        self._stats = EngineStats()
        self.limits = EngineLimits(spec=self.spec, vocab_size=int(model.config.vocab_size),
                                   num_blocks=num_blocks, block_size=config.block_size,
                                   has_tokenizer=tokenizer is not None, max_num_seqs=config.max_num_seqs)

    # ---- requests -------------------------------------------------------------------

    def make_prefix(self, kv: torch.Tensor, refs: tuple[PrefixRef, ...] = ()) -> Prefix:
        """Check kv [L, 2, Hkv, P, hd] against the model (once); keep a host copy in the engine dtype."""
        return Prefix.make(kv, self.spec, refs, self.dtype)

    def check_request(self, prompt_token_ids: list[int], sampling: SamplingParams, prefix: Prefix | None) -> None:
        """Raise RequestError naming the numbers if the request can never run. Changes nothing."""
        check_request(self.limits, prompt_token_ids, sampling, prefix)

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    prefix: Prefix | None = None, arrival_time: float | None = None, tenant: str = "") -> None:
        """Queue a request; `tenant` labels whose it is (the batch is shared fairly between tenants).
        With sampling.n > 1 its n samples share one request id; sample 0 computes the prompt and
        the others fork from it (sharing its blocks) when it is done."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, sampling, prefix)
        prompt = [int(t) for t in prompt_token_ids]
        samples = [Request(request_id, prompt, sampling, prefix, index=i, tenant=str(tenant))
                   for i in range(sampling.n)]
        if sampling.guided_regex is not None:  # compiles the pattern unless cached (raises GuideError)
            for req in samples:
                req.guide = self.guides.guide(sampling.guided_regex)
        for req in samples:
            if arrival_time is not None:
                req.arrival_time = arrival_time
        samples[0].forks = samples[1:]
        self.requests[request_id] = samples
        self.scheduler.add(samples[0])

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Free everything the request's samples hold, at once; their final outputs. Unknown
        or finished ids are ignored ([])."""
        samples = self.requests.pop(request_id, [])
        for req in samples:
            self._finish(req, FinishReason.ABORT)
        return [self._output(req) for req in samples]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration. A request that fails inside it (its sampling, stop strings or
        detokenization) finishes with FinishReason.ERROR and the others go on; a failed
        forward fails the requests of this step only."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        try:
            step = self.runner.run(sched.scheduled, sched.num_new_tokens)
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep the engine
            log.exception("the forward of a step with %d requests failed", len(sched.scheduled))
            return [out for req in sched.scheduled for out in self._fail(req, f"the model step failed ({type(e).__name__}: {e})")]
        outputs = self._score_prompts(step)
        rows, sampled = self._fork(step, sched)
        logits = step.sampled if len(rows) == len(step.requests) else step.sampled[rows]
        tokens = self._sample(logits, sampled)
        self._logprobs(logits, sampled, tokens)
        self._count(sched, len(sampled))
        ok = [(req, t) for req, t in zip(sampled, tokens) if not isinstance(t, Exception) and not req.is_finished]
        self.scheduler.postprocess(sched, [r for r, _ in ok], [t for _, t in ok], self.eos_token_ids,
                                   time.monotonic())
        for req, t in zip(sampled, tokens):
            if isinstance(t, Exception) and not req.is_finished:
                outputs += self._fail(req, f"{type(t).__name__}: {t}")
        for req, _ in ok:
            try:
                self._update_text(req)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("request %s failed in the step", req.request_id)
                outputs += self._fail(req, f"{type(e).__name__}: {e}")
                continue
            if req.is_finished:
                self._forget_if_done(req.request_id)
            out = self._output(req)
            if out.new_token_ids or out.finished or out.prompt_logprobs:
                outputs.append(out)
        return outputs

    def _score_prompts(self, step: StepLogits) -> list[RequestOutput]:
        """Prompt logprobs of the rows this step computed (requests with prompt_logprobs)."""
        failed: list[RequestOutput] = []
        start = 0
        for rows in step.prompt_rows:
            req = rows.request
            targets = req.prompt_token_ids[rows.first:rows.first + rows.count]
            try:
                req.prompt_logprobs += token_logprobs(step.prompt[start:start + rows.count], targets,
                                                      [req.sampling.prompt_logprobs] * rows.count)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                log.exception("scoring the prompt of request %s failed", req.request_id)
                failed += self._fail(req, f"{type(e).__name__}: {e}")
            start += rows.count
        return failed

    def _fork(self, step: StepLogits, sched: SchedulerOutput) -> tuple[list[int], list[Request]]:
        """Sample 0 of an n-sample request has computed the prompt: fork the other samples
        from it now. Each shares its blocks and samples its first token from the same
        logits row. Returns the logits row of every request to sample, and the requests."""
        rows, sampled = list(range(len(step.requests))), list(step.requests)
        q_of = {id(req): q for req, q in zip(sched.scheduled, sched.num_new_tokens)}
        for row, parent in enumerate(step.requests):
            if not parent.forks or parent.is_finished:
                continue
            computed = parent.num_computed_tokens + q_of[id(parent)]
            for child in parent.forks:
                if self.kv.fork(parent, child, computed):
                    child.num_computed_tokens = computed
                    self.scheduler.add_running(child)
                    rows.append(row)
                    sampled.append(child)
                else:  # no block free for its copy: it computes the prompt itself, later
                    self.scheduler.add(child)
            parent.forks = []
        return rows, sampled

    def _logprobs(self, logits: torch.Tensor, sampled: list[Request], tokens: list[int | Exception]) -> None:
        """The sampled tokens' logprobs, for the requests that asked (float32, raw logits)."""
        rows = [i for i, (req, t) in enumerate(zip(sampled, tokens))
                if req.sampling.logprobs is not None and req.sampling.max_tokens and not isinstance(t, Exception)]
        if not rows:
            return
        found = token_logprobs(logits[rows], [tokens[i] for i in rows], [sampled[i].sampling.logprobs for i in rows])
        for i, lp in zip(rows, found):
            sampled[i].logprobs.append(lp)
            sampled[i].cumulative_logprob += lp.logprob

    def _sample(self, logits: torch.Tensor, sampled: list[Request]) -> list[int | Exception]:
        """The next token of each sampled request; where sampling one row raises, that row's
        exception instead (the batch is retried row by row to find it)."""
        params = [r.sampling for r in sampled]
        index = [len(r.output_token_ids) for r in sampled]
        which = [r.index for r in sampled]
        guided = [i for i, r in enumerate(sampled) if r.guide is not None]
        if guided:  # structured output: only the tokens its pattern allows next
            logits = mask_logits(logits, guided, [sampled[i].guide for i in guided])
        try:
            out: list[int | Exception] = sample(logits, params, index, which)
        except Exception:  # noqa: BLE001
            out = []
            for row in range(len(sampled)):
                try:
                    out.extend(sample(logits[row:row + 1], params[row:row + 1], index[row:row + 1], which[row:row + 1]))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
        advance_guides(out, guided, [sampled[i].guide for i in guided], self.eos_token_ids)
        return out

    def _update_text(self, req: Request) -> None:
        """Detokenize req's new token; a stop string in the new text cuts it and finishes req."""
        old_len = len(req.output_text)
        self.detokenizer.update(req)
        cut = find_stop(req.output_text, req.sampling.stop, len(req.output_text) - old_len)
        if cut is not None:
            req.output_text = req.output_text[:cut]
            if req.is_finished:
                req.finish_reason = FinishReason.STOP  # the stop string came with the last token
            else:
                self.scheduler.finish(req, FinishReason.STOP)

    def _fail(self, req: Request, message: str) -> list[RequestOutput]:
        """req fails alone (with the samples still waiting to fork from it)."""
        samples = [req, *req.forks]
        for r in samples:
            r.error = message
        if req.is_finished:
            req.finish_reason = FinishReason.ERROR
        self._finish(req, FinishReason.ERROR)
        self._forget_if_done(req.request_id)
        return [self._output(r) for r in samples]

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """Finish req, and the samples still waiting to fork from it (never scheduled: they
        hold nothing)."""
        for child in req.forks:
            child.status, child.finish_reason = RequestStatus.FINISHED, reason
        req.forks = []
        if not req.is_finished:
            self.scheduler.finish(req, reason)

    def _forget_if_done(self, request_id: str) -> None:
        samples = self.requests.get(request_id)
        if samples is not None and all(r.is_finished for r in samples):
            del self.requests[request_id]

    def _output(self, req: Request) -> RequestOutput:
        finished = req.status == RequestStatus.FINISHED
        new_ids = req.output_token_ids[req.num_tokens_emitted:]
        upto = emittable(req.output_text, req.sampling.stop, finished)
        text = req.output_text[req.num_text_emitted:upto] if upto > req.num_text_emitted else ""
        req.num_tokens_emitted = len(req.output_token_ids)
        req.num_text_emitted = max(req.num_text_emitted, upto)
        out = RequestOutput(request_id=req.request_id, new_token_ids=new_ids, new_text=text,
                            finished=finished, finish_reason=req.finish_reason,
                            num_prompt_tokens=len(req.prompt_token_ids),
                            num_output_tokens=len(req.output_token_ids),
                            first_token_time=req.first_token_time, arrival_time=req.arrival_time,
                            error=req.error, index=req.index)
        if req.sampling.logprobs is not None:
            out.logprobs = req.logprobs[req.num_logprobs_emitted:]
            out.cumulative_logprob = req.cumulative_logprob
            req.num_logprobs_emitted = len(req.logprobs)
        scored = len(req.prompt_logprobs) == len(req.prompt_token_ids)
        if req.sampling.prompt_logprobs is not None and req.index == 0 and scored and not req.prompt_logprobs_sent:
            out.prompt_logprobs = list(req.prompt_logprobs)
            req.prompt_logprobs_sent = True
        return out

    # ---- convenience and stats --------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams],
                 prefixes: list[Prefix | None] | None = None) -> list[Request]:
        """Run prompts to completion; the finished Requests come back in input order (a
        prompt with n samples gives its n, in sample order)."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        prefixes = prefixes or [None] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p, pre in zip(ids, prompts, params, prefixes):
            self.add_request(rid, prompt, p, pre)
        reqs = [req for rid in ids for req in self.requests[rid]]
        while any(not r.is_finished for r in reqs):
            self.step()
        return reqs

    def score(self, prompt_token_ids: list[int], prefix: Prefix | None = None) -> torch.Tensor:
        """Logits [n, V] (float32) at every prompt position, through the serving path.

        Runs one forward outside the step loop (call it from the thread that steps), with
        blocks taken from the KV manager and given back before it returns.
        """
        sampling = SamplingParams(max_tokens=1)
        self.check_request(prompt_token_ids, sampling, prefix)
        req = Request(f"score-{time.monotonic_ns()}", list(prompt_token_ids), sampling, prefix)
        n = len(prompt_token_ids)
        try:
            if not self.kv.acquire_prefix(req):
                raise RuntimeError("no room in the KV pool for the prefix")
            if not self.kv.allocate(req, n):
                raise RuntimeError("no room in the KV pool for the prompt")
            req.status = RequestStatus.RUNNING
            inp = self.runner.prepare([req], [n])
            inp.logits_indices = torch.arange(n, device=self.device)
            return self.runner.execute(inp).float()
        finally:
            self.kv.free(req)

    def prompt_kv(self, token_ids: list[int], prefix: Prefix | None = None) -> torch.Tensor:
        """The keys and values the model computes for `token_ids` (after `prefix`, if any), as
        a prefix kv [L, 2, Hkv, n, hd]: what its cache holds, keys rotated at their positions.
        Served as a prefix, they give what sending the tokens in the prompt gives.

        Runs outside the step loop, in chunks of max_num_batched_tokens (call it from the
        thread that steps), with blocks taken from the KV manager and given back.
        """
        sampling = SamplingParams(max_tokens=1)  # the text must leave room to generate
        self.check_request(token_ids, sampling, prefix)
        req = Request(f"kv-{time.monotonic_ns()}", [int(t) for t in token_ids], sampling, prefix)
        n = len(req.prompt_token_ids)
        try:
            if not self.kv.acquire_prefix(req) or not self.kv.allocate(req, n):
                raise KVPoolBusy(f"no room in the KV pool for {n} tokens now; retry shortly")
            req.status = RequestStatus.RUNNING
            while req.num_computed_tokens < n:
                q = min(self.config.max_num_batched_tokens, n - req.num_computed_tokens)
                inp = self.runner.prepare([req], [q])
                inp.logits_indices = inp.logits_indices[:0]  # only the cache writes are wanted
                self.runner.execute(inp)
                req.num_computed_tokens += q
            return self.runner.read_slots(req.own_blocks, n)
        finally:
            self.kv.free(req)

    def _count(self, sched: SchedulerOutput, num_sampled: int) -> None:
        s = self._stats
        s.steps += 1
        s.last_step_tokens = sum(sched.num_new_tokens)
        s.last_step_requests = len(sched.num_new_tokens)
        s.generated_tokens += num_sampled
        for req, q in zip(sched.scheduled, sched.num_new_tokens):
            # Rows before the last known token are prompt (or recomputed) tokens.
            s.prompt_tokens += q - (1 if req.num_computed_tokens + q == req.num_tokens and req.output_token_ids else 0)
        s.scheduled_tokens += s.last_step_tokens
        s.scheduled_requests += s.last_step_requests

    def stats(self) -> EngineStats:
        """A snapshot of plain numbers (cumulative counters and current gauges)."""
        s = self._stats
        prefixes = self.kv.prefixes
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            waiting_by_tenant=self.scheduler.waiting_by_tenant(),
            kv_blocks_total=self.kv.num_blocks, kv_blocks_free=self.kv.num_free,
            kv_blocks_used_by_prefixes=prefixes.num_blocks, prefixes_resident=len(prefixes),
            prefixes_resident_bytes=prefixes.nbytes, prefix_hits=prefixes.hits, prefix_misses=prefixes.misses,
            prefix_evictions=prefixes.evictions, preemptions=self.scheduler.num_preemptions, steps=s.steps,
            prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
            last_step_tokens=s.last_step_tokens, last_step_requests=s.last_step_requests,
            scheduled_tokens=s.scheduled_tokens, scheduled_requests=s.scheduled_requests)


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
