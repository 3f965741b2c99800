"""The synchronous engine core: ``add``, ``abort``, ``step``, ``export`` / ``import_``, ``load``.

No threads, no asyncio, no HTTP: servers, cluster actors and the simulator wrap it. It owns the
requests, the scheduler and the block manager; an :class:`Executor` runs each step's plan (the
model on a device, or a cost model in the simulator). Every request ends exactly once, as finished
(stop / length), aborted, or failed with a readable reason.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from shoal.engine.block_manager import BlockManager
from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.executor import Executor
from shoal.engine.guided import GrammarCompiler, replay
from shoal.engine.outputs import SHED_ERROR, InstanceLoad, RequestOutput, RequestState, RunningRequest
from shoal.engine.metadata import RequestMetadata
from shoal.engine.preemption import pick_shed_victim
from shoal.engine.request import FinishReason, Request, Status
from shoal.engine.sampler import SamplingState, make_generator
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from shoal.engine.speculative import SpeculativeConfig, propose_ngram, speculates

log = logging.getLogger(__name__)


class EngineCore:
    """Continuous batching over one executor. Times come only from ``clock``.

    With a tokenizer it turns generated tokens into text; with ``detokenize_all`` set False (before
    any request) it decodes only the requests with stop strings, whose text it must see to stop at
    one: the others' outputs carry no text, for an API process to decode."""

    def __init__(
        self,
        executor: Executor,
        block_manager: BlockManager,
        scheduler_config: SchedulerConfig,
        *,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        tokenizer=None,
        clock: Callable[[], float] = time.monotonic,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        """``speculative_config``: n-gram drafting for requests that do not set their own."""
        self.executor = executor
        self.block_manager = block_manager
        self.scheduler = Scheduler(scheduler_config, block_manager)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.last_plan: StepPlan | None = None
        self._sampling: dict[str, SamplingState] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.detokenize_all = True
        self._pending: list[RequestOutput] = []  # outputs of requests ended outside step()
        self._eos = set(eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self._eos.add(tokenizer.eos_token_id)
        self._next_id = 0
        self.num_added = 0  # requests ever queued by add (the global scheduler's dispatch count)
        self._suspended: dict[str, Request] = {}  # exported, KV kept until release / restore
        self.num_restarts = 0  # times recover() started over
        self._grammar: GrammarCompiler | None = None
        self.speculative_config = speculative_config
        self.num_draft_tokens = 0  # speculative tokens scored, ever
        self.num_accepted_tokens = 0  # of which accepted

    # ---- requests in ----------------------------------------------------------------------------

    def add(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        *,
        req_id: str | None = None,
        priority: int | None = None,
        arrival_time: float | None = None,
        metadata: RequestMetadata | None = None,
    ) -> str:
        """Queue a request. Raises ValueError (and changes nothing) for bad input. ``metadata``
        carries its priority (``priority`` alone is the short form) and SLO: its first token is
        due ``slo.ttft_s`` after arrival, which deadline admission orders by."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        if params.n != 1:
            raise ValueError(f"an engine request is one sequence (n=1, got n={params.n}); "
                             "add one request per completion with params.for_choice(i), as LLM does")
        if req_id is None:
            req_id = f"req-{self._next_id}"
            self._next_id += 1
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        self._validate_prompt(prompt_token_ids)
        matcher = self._matcher(params, [])
        if metadata is None:
            metadata = RequestMetadata(priority=0 if priority is None else priority)
        elif priority is not None and priority != metadata.priority:
            raise ValueError("priority given twice, differently (as an argument and in the metadata)")
        arrival = self.clock() if arrival_time is None else arrival_time
        req = Request(
            req_id=req_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            arrival_time=arrival,
            priority=metadata.priority,
            deadline=_deadline(arrival, metadata),
            metadata=metadata,
        )
        self._track(req, make_generator(params), matcher)
        self.scheduler.add(req)
        self.num_added += 1
        return req_id

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """This engine's grammar compiler (built on first use: it converts the tokenizer)."""
        if self._grammar is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer, which this engine was started without")
            self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._grammar

    def _matcher(self, params: SamplingParams, output_token_ids: list[int]):
        """The grammar matcher of a guided request, advanced over ``output_token_ids`` (None when
        unconstrained). Also checks ``logit_bias`` ids. Raises ValueError before any change."""
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {self.vocab_size}")
        if params.structured_outputs is None:
            return None
        matcher = self.grammar_compiler.matcher(params.structured_outputs)
        replay(matcher, output_token_ids)
        return matcher

    def _validate_prompt(self, ids: list[int]) -> None:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise TypeError("the prompt must be a list of token ids (tokenize text first)")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise TypeError("token ids must be integers")
        if len(ids) == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")

    def _track(self, req: Request, generator: torch.Generator | None, matcher=None) -> None:
        self.requests[req.req_id] = req
        self._sampling[req.req_id] = SamplingState(
            params=req.params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            generator=generator,
            matcher=matcher,
            speculative=speculates(req.params, self.speculative_config),
        )
        if self.tokenizer is not None and (self.detokenize_all or req.params.stop):
            self._detok[req.req_id] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params)

    def abort(self, req_id: str) -> bool:
        """Cancel a request; its final output comes with the next ``step``. False if unknown or
        already ended."""
        req = self.requests.get(req_id)
        if req is None:
            return False
        self._finish(req, FinishReason.ABORT, pending=True)
        return True

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with ``error`` (a shutdown past its drain timeout); returns their
        final outputs, with any not yet handed out."""
        outputs, self._pending = self._pending, []
        return outputs + [self._finish(req, FinishReason.ERROR, error=error) for req in list(self.requests.values())]

    def recover(self, error: str) -> list[RequestOutput]:
        """After :meth:`step` itself raised (a fault no one request can be blamed for, so the
        scheduler and block manager may be half-updated): end every request with ``error`` and
        start again from an empty scheduler and block manager. The model and its KV tensors stay."""
        now = self.clock()
        outputs = []
        for req in [*self.requests.values(), *self._suspended.values()]:
            req.status, req.finish_reason, req.error, req.finished_time = Status.FINISHED, FinishReason.ERROR, error, now
            outputs.append(self._output(req, [], ""))
        bm, sched = self.block_manager, self.scheduler
        if bm.tier is not None:
            bm.tier.clear()
        self.block_manager = BlockManager(bm.num_blocks, bm.block_size, bm.num_swap_blocks, bm.enable_prefix_caching,
                                          bm.tier)
        self.block_manager.prefix_queries, self.block_manager.prefix_hits = bm.prefix_queries, bm.prefix_hits
        self.scheduler = Scheduler(sched.config, self.block_manager)
        self.scheduler.num_preemptions = sched.num_preemptions
        self.scheduler.fair = sched.fair  # tenants' service so far still counts
        self.scheduler.num_swapped_out_blocks = sched.num_swapped_out_blocks
        self.num_restarts += 1
        self.requests.clear()
        self._sampling.clear()
        self._detok.clear()
        self._pending.clear()
        self._suspended.clear()
        self.executor.reset()
        return outputs

    # ---- the step -------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        """Schedule and run one forward pass; return the outputs of requests that advanced or ended."""
        outputs, self._pending = self._pending, []
        now = self.clock()
        self._propose_drafts()
        plan = self.scheduler.schedule(now)
        self.last_plan = plan
        if plan.empty:
            return outputs
        sampled = [c for c in plan.chunks if c.sample]
        try:
            result = self.executor.execute(plan, [self._sampling[c.req_id] for c in sampled])
            accepted = {} if result.num_accepted is None else {
                c.req_id: a for c, a in zip(sampled, result.num_accepted) if c.num_drafts}
            self.scheduler.commit(plan, self.requests, accepted)
        except Exception as exc:  # a failed forward fails its batch, not the engine
            log.exception("step failed")
            self._undo_swap_outs(plan)
            self.block_manager.forget_tier_copies(plan.tier_out, plan.tier_in)
            for c in plan.chunks:
                req = self.requests.get(c.req_id)
                if req is not None:
                    outputs.append(self._finish(req, FinishReason.ERROR, error=f"engine step failed: {exc}"))
            return outputs
        now = self.clock()
        for i, c in enumerate(sampled):
            req = self.requests[c.req_id]
            tokens = [result.token_ids[i]]
            if c.num_drafts:
                kept = accepted[c.req_id]
                tokens[:0] = c.token_ids[c.num_tokens - c.num_drafts:][:kept]
                self.num_draft_tokens += c.num_drafts
                self.num_accepted_tokens += kept
            outputs.append(self._append_tokens(req, tokens, result.logprobs[i], now))
        return outputs

    def _propose_drafts(self) -> None:
        """n-gram drafts for the running decodes that speculate, within their token limits."""
        for req in self.scheduler.running:
            cfg = self._sampling[req.req_id].speculative
            if cfg is None:
                continue
            if req.is_prefilling:
                req.draft_token_ids = []
                continue
            room = min(req.params.max_tokens - len(req.output_token_ids), self.max_model_len - req.num_tokens) - 1
            req.draft_token_ids = propose_ngram(req.all_token_ids, cfg, room)

    def _undo_swap_outs(self, plan: StepPlan) -> None:
        """A failed step may not have copied its swap-outs: those victims recompute instead."""
        for req_id, mode in plan.preempted:
            req = self.requests.get(req_id)
            if req is not None and req.status is Status.SWAPPED:
                self.scheduler.recompute_instead(req)

    def _append_tokens(self, req: Request, tokens: list[int], logprob, now: float) -> RequestOutput:
        """Append a step's tokens (one, or accepted drafts and one more) up to the first that ends
        the request; ``logprob`` belongs to a single token."""
        if req.first_token_time is None:
            req.first_token_time = now
        params = req.params
        detok = self._detok.get(req.req_id)
        matcher = self._sampling[req.req_id].matcher
        for j, token in enumerate(tokens):
            req.output_token_ids.append(token)
            reason, stop = None, None
            stop_str = detok.update(token) if detok is not None else None
            if matcher is not None and not matcher.consume_token(token):  # the mask allowed it: a bug, not the client's
                out = self._finish(req, FinishReason.ERROR, error=f"guided decoding failed: {matcher.get_error()}", now=now)
                out.new_token_ids = tokens[: j + 1]
                return out
            if token in params.stop_token_ids:
                reason, stop = FinishReason.STOP, token
            elif token in self._eos and not params.ignore_eos:
                reason = FinishReason.STOP
            elif stop_str is not None:
                reason, stop = FinishReason.STOP, stop_str
            elif matcher is not None and matcher.is_stopped():  # the grammar is complete
                reason = FinishReason.STOP
            elif len(req.output_token_ids) >= params.max_tokens or req.num_tokens >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                req.stop_reason = stop
                out = self._finish(req, reason, now=now)
                out.new_token_ids = tokens[: j + 1]
                out.logprobs = [logprob] if logprob is not None else None
                return out
        return self._output(req, tokens, detok.get_delta() if detok else "", logprob)

    def _output(self, req: Request, tokens: list[int], text: str, logprob=None) -> RequestOutput:
        return RequestOutput(
            req_id=req.req_id,
            new_token_ids=tokens,
            new_text=text,
            finished=req.finished,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            error=req.error,
            logprobs=[logprob] if logprob is not None else None,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
            finished_time=req.finished_time,
            metadata=req.metadata,
        )

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        *,
        error: str | None = None,
        now: float | None = None,
        pending: bool = False,
    ) -> RequestOutput:
        """End a request exactly once: free its KV (or pin it for its program's next turn), forget
        it, build its final output."""
        now = self.clock() if now is None else now
        self.scheduler.finish(req, now, completed=reason in (FinishReason.STOP, FinishReason.LENGTH))
        del self.requests[req.req_id]
        self._sampling.pop(req.req_id)
        detok = self._detok.pop(req.req_id, None)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finished_time = now
        text = detok.finish() if detok is not None else ""
        out = self._output(req, [], text)
        if pending:
            self._pending.append(out)
        return out

    # ---- load and migration ---------------------------------------------------------------------

    def load(self) -> InstanceLoad:
        bm, s = self.block_manager, self.scheduler
        pins, tier = s.programs.stats, bm.tier
        return InstanceLoad(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_swapped=len(s.swapped),
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free,
            num_used_blocks=bm.num_used,
            num_cached_blocks=bm.num_cached_free,
            num_pinned_blocks=bm.num_pinned,
            block_size=bm.block_size,
            tokens_in_flight=sum(r.num_computed_tokens for r in s.running),
            waiting_prompt_tokens=sum(r.num_tokens - r.num_computed_tokens for r in s.waiting)
            + sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in s.running),
            num_preemptions=s.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            max_num_seqs=s.config.max_num_seqs,
            num_restarts=self.num_restarts,
            running=tuple(RunningRequest(r.req_id, r.priority, r.num_tokens) for r in s.running),
            lowest_waiting_priority=max((r.priority for r in s.waiting if not r.output_token_ids), default=None),
            num_added=self.num_added,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            program_pins=pins.pins,
            program_pin_hits=pins.pin_hits,
            program_pins_expired=pins.expired,
            program_pins_yielded=pins.yielded + pins.displaced,
            num_tier_blocks=tier.num_slots if tier else 0,
            num_tier_used_blocks=tier.num_used if tier else 0,
            tier_demoted_blocks=tier.demoted_blocks if tier else 0,
            tier_loaded_blocks=tier.loaded_blocks if tier else 0,
        )

    def shed(self, priority: int) -> str | None:
        """Under overload, end the queued request of the worst priority (worse than ``priority``;
        the latest among equals) that has produced nothing yet, with :data:`SHED_ERROR`; its final
        output comes with the next ``step``. Returns its id, or None if there is none."""
        victim = pick_shed_victim((r for r in self.scheduler.waiting if not r.output_token_ids), priority)
        if victim is None:
            return None
        self._finish(victim, FinishReason.ERROR, error=SHED_ERROR, pending=True)
        return victim.req_id

    def read_blocks(self, req_id: str, start_block: int) -> tuple[torch.Tensor | None, int]:
        """KV of a running request's full, computed blocks from ``start_block`` on, copied while it
        keeps running (the staged phase of live migration). Returns the KV and the next block."""
        req = self.requests.get(req_id)
        if req is None or req.status is not Status.RUNNING:
            return None, start_block
        full = req.num_computed_tokens // self.block_manager.block_size
        if full <= start_block:
            return None, start_block
        return self.executor.read_kv(self.block_manager.table(req_id)[start_block:full]), full

    def export(self, req_id: str, from_block: int = 0, release: bool = True) -> RequestState:
        """Take a request out of this engine with everything needed to resume it elsewhere
        (tokens, sampling RNG, detokenizer position, KV blocks from ``from_block`` on — earlier
        ones were staged already). It produces no final output here.

        With ``release=False`` the request is only suspended: it keeps its KV until
        :meth:`release` (migration committed) or :meth:`restore` (migration rolled back)."""
        req = self.requests.get(req_id)
        if req is None:
            raise KeyError(f"unknown request {req_id!r}")
        kv = None
        bm = self.block_manager
        if req.status is Status.SWAPPED:
            kv = self._swapped_kv(req_id, from_block)
        elif req.status is Status.RUNNING and req.num_computed_tokens:
            n = bm.blocks_needed(req.num_computed_tokens)
            kv = self.executor.read_kv(bm.table(req_id)[from_block:n])
        if kv is None and from_block:
            raise ValueError(f"{req_id} has no KV to continue a staged copy from block {from_block}")
        num_computed = req.num_computed_tokens if kv is not None else 0
        gen = self._sampling[req_id].generator
        detok = self._detok.get(req_id)
        state = RequestState(
            req_id=req_id,
            prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids),
            params=req.params,
            priority=req.priority,
            arrival_time=req.arrival_time,
            num_computed_tokens=num_computed,
            generator_state=gen.get_state() if gen is not None else None,
            emitted_text_len=detok.emitted_len if detok is not None else 0,
            num_cached_tokens=req.num_cached_tokens,
            num_preemptions=req.num_preemptions,
            first_token_time=req.first_token_time,
            kv=kv,
            kv_start_block=from_block,
            metadata=req.metadata,
        )
        self.scheduler.detach(req)
        del self.requests[req_id]
        if release:
            self.block_manager.free(req_id)
            self._sampling.pop(req_id)
            self._detok.pop(req_id, None)
        else:
            self._suspended[req_id] = req
        return state

    def _swapped_kv(self, req_id: str, from_block: int) -> torch.Tensor | None:
        """A swapped-out request's KV from ``from_block`` on: its resident prefix from the device,
        the rest from the swap pool; None if the resident prefix was evicted."""
        resident = self.block_manager.resident_blocks(req_id)
        if resident is None:
            return None
        parts = [self.executor.read_kv(resident[from_block:])] if len(resident) > from_block else []
        tail = self.block_manager.swapped[req_id][max(0, from_block - len(resident)):]
        parts.append(self.executor.read_kv(tail, swapped=True))
        return torch.cat(parts, dim=3)

    def release(self, req_id: str) -> None:
        """Commit a migration away: free the suspended request's KV here."""
        self._suspended.pop(req_id)
        self.block_manager.free(req_id)
        self._sampling.pop(req_id)
        self._detok.pop(req_id, None)

    def restore(self, req_id: str) -> None:
        """Roll a migration back: the suspended request continues here where it stopped."""
        req = self._suspended.pop(req_id)
        self.requests[req_id] = req
        self.scheduler.attach(req)

    def stage_kv(self, req_id: str, kv: torch.Tensor, start_block: int) -> None:
        """Receive blocks ``[start_block, start_block + n)`` of an incoming migration before the
        request itself arrives (:meth:`import_` then needs only the tail)."""
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        bm = self.block_manager
        staged = len(bm.table(req_id)) if req_id in bm.tables else 0
        if staged != start_block:
            raise ValueError(f"staged copy of {req_id} expects block {staged}, got {start_block}")
        n = kv.shape[3]
        if n > bm.num_free:
            raise ValueError(f"no room: {n} KV blocks needed, {bm.num_free} free")
        if req_id not in bm.tables:
            bm.allocate(req_id, [], 0)
        blocks = bm.ensure_slots(req_id, (start_block + n) * bm.block_size)
        self._write_kv(blocks, kv)

    def _write_kv(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Write KV into device blocks outside a step; the cached blocks their allocation evicted
        are demoted to the second tier first."""
        copies_out, copies_in = self.block_manager.take_tier_copies()
        if copies_out or copies_in:
            self.executor.copy_tier(copies_out, copies_in)
        self.executor.write_kv(blocks, kv)

    def unstage(self, req_id: str) -> None:
        """Drop the staged blocks of a migration that will not complete."""
        if req_id not in self.requests:
            self.block_manager.free(req_id)

    def import_(self, state: RequestState) -> None:
        """Resume an exported request here. Raises ValueError (changing nothing) if it does not fit."""
        if state.req_id in self.requests:
            raise ValueError(f"request id {state.req_id!r} is already in use")
        matcher = self._matcher(state.params, state.output_token_ids)
        req = Request(
            req_id=state.req_id,
            prompt_token_ids=list(state.prompt_token_ids),
            params=state.params,
            arrival_time=state.arrival_time,
            priority=state.priority,
            output_token_ids=list(state.output_token_ids),
            num_cached_tokens=state.num_cached_tokens,
            num_preemptions=state.num_preemptions,
            first_token_time=state.first_token_time,
            metadata=state.metadata,
            deadline=_deadline(state.arrival_time, state.metadata),
        )
        if req.num_tokens >= self.max_model_len:
            raise ValueError(f"request has {req.num_tokens} tokens; this engine holds {self.max_model_len}")
        bm = self.block_manager
        staged = len(bm.tables[req.req_id].blocks) if req.req_id in bm.tables else 0
        if staged != state.kv_start_block:
            raise ValueError(f"{state.kv_start_block} KV blocks should have been staged, found {staged}")
        if state.kv is not None:
            if len(self.scheduler.running) >= self.scheduler.config.max_num_seqs:
                raise ValueError(f"no room: {len(self.scheduler.running)} requests already running (max_num_seqs)")
            n_blocks = state.kv_start_block + state.kv.shape[3]
            if n_blocks != bm.blocks_needed(state.num_computed_tokens):
                raise ValueError("exported KV does not match its computed-token count")
            if n_blocks - staged > bm.num_free:
                raise ValueError(f"no room: {n_blocks - staged} KV blocks needed, {bm.num_free} free")
            if not staged:
                bm.allocate(req.req_id, [], 0)
            blocks = bm.ensure_slots(req.req_id, state.num_computed_tokens)
            bm.tables[req.req_id].salt = req.cache_salt  # its blocks join the prefix cache under its own salt
            try:
                self._write_kv(blocks, state.kv)
            except Exception:
                bm.free(req.req_id)
                raise
            req.num_computed_tokens = state.num_computed_tokens
            req.status = Status.RUNNING
            self.scheduler.running.append(req)
        else:
            self.scheduler.add(req)
        gen = None
        if state.generator_state is not None:
            gen = make_generator(state.params)
            gen.set_state(state.generator_state)
        self._track(req, gen, matcher)
        detok = self._detok.get(req.req_id)
        if detok is not None:
            detok.replay(req.output_token_ids, state.emitted_text_len)


def _deadline(arrival: float, metadata: RequestMetadata | None) -> float | None:
    """When a request's first token is due: ``slo.ttft_s`` after it arrived (None without an SLO)."""
    return None if metadata is None or metadata.slo is None else arrival + metadata.slo.ttft_s
