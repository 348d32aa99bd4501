"""The stage runtime: one stage file's layers run by llama.cpp over many sequences at once.

Input is token ids (first stage) or float32 hidden states ``[n_rows, n_embd]``. A non-final stage hands
out the residual stream after its last layer, read by the C eval callback of capture.py at the node
``l_out-{n_layer-1}`` (the graph stops there: the final norm and head are never computed). The final stage
samples the next token of each sequence that asks for one, with the sequence's own sampler chain.

Every public method that touches llama.cpp or the sequence table runs one call at a time, in order, on the runtime's
worker thread (``await runtime.call(runtime.forward, ...)``): llama.cpp contexts are not thread-safe, and an event
loop must not wait on a long ``llama_decode``. A short call may run on the caller's thread while the worker is idle
(``run_here_if_idle``: the stage's batcher does so for small steps). Other threads read only ``stats`` (and the
properties built on it), a snapshot published after every call.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import llama_cpp as llama
import numpy as np

from chatloop import step_trace
from chatloop.engine.capture import HiddenCapture
from chatloop.engine.errors import CapacityError, ContextOverflowError, InvalidStepError, KVMissingError
from chatloop.engine.grammar import GrammarError
from chatloop.engine.handles import Batch, Context, Model, Sampler
from chatloop.engine.sampling import build_sampler
from chatloop.engine.slots import compaction, pick_slot, reclaimable, ubatch_groups
from chatloop.engine.worker_thread import WorkerThread
from chatloop.protocol.messages import BLOCK_ROWS, SampledToken, SeqStep
from chatloop.protocol.sampling import SamplingParams

log = logging.getLogger(__name__)


class RuntimeStats(NamedTuple):
    """What the event loop may read about a runtime: a snapshot taken after each call (a tuple: built once per
    forward call, it is the cheapest immutable record)."""

    live_ids: frozenset[int] = frozenset()  # sequences holding KV here
    kv_tokens_used: int = 0  # KV positions those sequences hold together
    decode_count: int = 0  # llama_decode calls so far
    ubatch_count: int = 0  # passes over the weights those calls took (llama.cpp ubatches)
    slots: Mapping[int, int] = MappingProxyType({})  # each live sequence's slot (KV stream)
    moves: int = 0  # idle sequences moved out of a micro-batch's way (slots.reclaimable)


@dataclass(frozen=True)
class StageRole:
    first: bool  # takes token ids (holds the token embedding)
    last: bool  # produces logits and samples (holds the output norm and head)


@dataclass
class _SeqState:
    slot: int
    n_past: int = 0
    block_end: int = 0  # positions below are computed in whole BLOCK_ROWS blocks (see plan_decodes)
    sampler: Sampler | None = None
    params: SamplingParams | None = None
    last_used: float = field(default_factory=time.monotonic)
    last_call: int = 0  # the runtime's forward-call count when the sequence last stepped


@dataclass(frozen=True)
class RuntimeOptions:
    n_threads: int = 2  # llama.cpp compute threads
    n_ctx: int = 0  # KV positions of all sequences together; 0 = from kv_cache_mb
    kv_cache_mb: int = 256  # KV cache budget when n_ctx is 0, split evenly between max_sequences
    max_sequences: int = 16  # sequences with live KV at once
    n_batch: int = 512  # most rows in one llama_decode
    # Rows llama.cpp computes at once. Prompts run in whole 64-row blocks (flash attention's fast tiled kernel),
    # decode rows below 64 per sequence (its row kernel): see plan_decodes for why the result stays canonical.
    n_ubatch: int = 512
    flash_attn: bool = True  # llama.cpp flash attention (one KV stream per sequence needs it on the CPU backend?)


def kv_bytes_per_token(model: Model) -> int:
    """Bytes of f16 K and V one token occupies across this model's layers."""
    arch = model.meta("general.architecture") or "llama"
    n_head = llama.llama_model_n_head(model.handle)
    n_head_kv = llama.llama_model_n_head_kv(model.handle)
    key_len = model.meta(f"{arch}.attention.key_length")
    val_len = model.meta(f"{arch}.attention.value_length")
    head_k = int(key_len) if key_len else model.n_embd // max(n_head, 1)
    head_v = int(val_len) if val_len else model.n_embd // max(n_head, 1)
    return model.n_layer * n_head_kv * (head_k + head_v) * 2


class StageRuntime:
    """Runs one stage file; owns its model, context, batches, samplers and worker thread."""

    def __init__(
        self,
        path: str | pathlib.Path,
        role: StageRole,
        options: RuntimeOptions | None = None,
        executor: WorkerThread | None = None,
    ) -> None:
        """``executor``: a worker thread to share with other runtimes of this process (default: its own).
        NOTE: llama.cpp's OpenMP threads form one team per calling thread, and an idle team spins for a while
        after each decode: runtimes that decode in turn in one process (LocalChain) should share one thread."""
        self.options = opts = options or RuntimeOptions()
        self.role = role
        self.path = pathlib.Path(path)
        self._owns_executor = executor is None
        self._executor = executor or WorkerThread(f"decode-{self.path.stem}")
        self.model = Model(self.path)
        try:
            self.n_embd = self.model.n_embd
            self.n_layer = self.model.n_layer
            self.n_vocab = self.model.n_vocab
            self.kv_bytes_per_token = kv_bytes_per_token(self.model)
            if opts.max_sequences > opts.n_ubatch:
                raise ValueError(f"max_sequences ({opts.max_sequences}) must not exceed n_ubatch ({opts.n_ubatch})")
            total = opts.n_ctx or (opts.kv_cache_mb * 1024 * 1024) // max(self.kv_bytes_per_token, 1)
            per_seq = min(max(64, total // opts.max_sequences), self.model.n_ctx_train)
            n_ctx = per_seq * opts.max_sequences
            params = llama.llama_context_default_params()
            params.n_ctx = int(n_ctx)
            params.n_batch = opts.n_batch
            params.n_ubatch = min(opts.n_ubatch, opts.n_batch)
            params.n_seq_max = opts.max_sequences
            params.n_threads = opts.n_threads
            params.n_threads_batch = opts.n_threads
            # NOTE: one KV stream per sequence (kv_unified False): a sequence's cells then stay in position order
            # whatever else runs, so attention sums in the same order and greedy output does not depend on the
            # other sequences. llama.cpp then splits batches with split_equal, which permutes rows: see
            # slots.ubatch_order() (docs/design.md, mechanism 7).
            params.kv_unified = False
            params.flash_attn_type = (
                llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if opts.flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            params.no_perf = True
            self._capture: HiddenCapture | None = None
            if not role.last:
                self._capture = HiddenCapture(f"l_out-{self.n_layer - 1}", opts.n_batch, self.n_embd)
                self._capture.install(params)
            self.ctx = Context(self.model, params)
            self.n_ctx = self.ctx.n_ctx
            self.n_ctx_seq = llama.llama_n_ctx_seq(self.ctx.handle)
            self._batch = Batch(opts.n_batch, self.n_embd if not role.first else 0)
            self.model.on_close(self._batch.close)
        except BaseException:
            self.model.close()
            if self._owns_executor:
                self._executor.shutdown(wait=False)
            raise
        self._seqs: dict[int, _SeqState] = {}
        # NOTE: sequences stepped together get consecutive slots where they can (slots.pick_slot): llama.cpp
        # puts only consecutive sequence ids into one ubatch.
        self._free_slots = set(range(opts.max_sequences))
        self._decode_count = 0
        self._forward_count = 0  # successful forward calls (when each sequence last stepped: _SeqState.last_call)
        self._moves = 0  # idle sequences moved to another slot (slots.reclaimable)
        self._ubatch_count = 0
        self._last_outs: list[tuple[int, int, int]] = []  # (batch row, step index, output row) of the last decode
        self.stats = RuntimeStats()

    # -- lifecycle -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free every handle (samplers, batch, context, model) and stop the worker thread (if its own)."""
        if self.model.closed:
            return
        # NOTE: work already queued for this runtime finishes first; the samplers are freed on the worker too.
        self._executor.submit(self._drop_samplers).result()
        if self._owns_executor:
            self._executor.shutdown(wait=True)
        self.model.close()

    def _drop_samplers(self) -> None:
        for state in self._seqs.values():
            if state.sampler:
                state.sampler.close()
        self._seqs.clear()
        self._publish()

    def __enter__(self) -> StageRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread and await its result."""
        return await self._executor.call(fn, *args)

    def run_here_if_idle(self, fn, *args) -> tuple[bool, object]:
        """Run ``fn(*args)`` on this thread if the worker thread has nothing queued or running: ``(True, result)``;
        else ``(False, None)``, not run (``WorkerThread.run_here_if_idle``)."""
        return self._executor.run_here_if_idle(fn, *args)

    def run(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread and block for its result (for synchronous callers)."""
        return self._executor.submit(fn, *args).result()

    # -- state -----------------------------------------------------------------------------------------

    # NOTE: these read the snapshot the worker thread publishes after every call (``stats``), never the live
    # sequence table: the event loop may read them while a decode adds to that table.
    @property
    def live_sequences(self) -> int:
        return len(self.stats.live_ids)

    def live_ids(self) -> frozenset[int]:
        """Ids of the sequences holding KV here, as of the end of the last call."""
        return self.stats.live_ids

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (EOS, EOT, ...). Reads the vocabulary only: safe from any thread."""
        return bool(llama.llama_vocab_is_eog(self.model.vocab, token))

    @property
    def kv_tokens_used(self) -> int:
        return self.stats.kv_tokens_used

    @property
    def decode_count(self) -> int:
        return self.stats.decode_count

    def _publish(self) -> None:
        """Worker thread: replace the stats snapshot (one attribute store, atomic for readers)."""
        self.stats = RuntimeStats(
            live_ids=frozenset(self._seqs),
            kv_tokens_used=sum(st.n_past for st in self._seqs.values()),
            decode_count=self._decode_count,
            ubatch_count=self._ubatch_count,
            slots={seq: st.slot for seq, st in self._seqs.items()},
            moves=self._moves,
        )

    def seq_len(self, seq_id: int) -> int:
        state = self._seqs.get(seq_id)
        return state.n_past if state else 0

    def release_idle(self, older_than_secs: float) -> list[int]:
        """Free the sequences nobody has stepped for ``older_than_secs``; returns their ids."""
        cutoff = time.monotonic() - older_than_secs
        idle = [seq for seq, st in self._seqs.items() if st.last_used < cutoff]
        for seq in idle:
            self.release(seq)
        return idle

    def release(self, seq_id: int) -> bool:
        """Free a sequence's KV cells and sampler; False when it was not live."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            return False
        self.ctx.seq_rm(state.slot)
        if state.sampler:
            state.sampler.close()
        self._free_slots.add(state.slot)
        self._publish()
        return True

    def release_all(self) -> int:
        ids = list(self._seqs)
        for seq_id in ids:
            self.release(seq_id)
        return len(ids)

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, steps: list[SeqStep], data: np.ndarray) -> np.ndarray | list[SampledToken]:
        """Run one set of sequence steps.

        ``data`` holds the rows of all steps in order: int32 token ids ``[n_rows]`` on the first stage,
        float32 hidden states ``[n_rows, n_embd]`` elsewhere. Returns the hidden rows after this stage's
        last layer (non-final stages) or one ``SampledToken`` per step with ``sample`` set (final stage).
        """
        if step_trace.ENABLED:
            step_trace.mark("forward")
        try:
            return self._forward(steps, data)
        finally:
            self._publish()
            if step_trace.ENABLED:
                step_trace.mark("forward_end")

    def _forward(self, steps: list[SeqStep], data: np.ndarray) -> np.ndarray | list[SampledToken]:
        n_rows = self._check(steps, data)
        states = self._prepare(steps)
        offsets = [0]  # first input row of each step
        for s in steps:
            offsets.append(offsets[-1] + s.n_tokens)
        hidden = None if self.role.last else np.empty((n_rows, self.n_embd), dtype=np.float32)
        sampled: dict[int, list[SampledToken]] = {}
        try:
            for call in plan_decodes(steps, states, self.options.n_batch, self.options.n_ubatch):
                self._decode_call(call, steps, states, offsets, data, hidden, sampled)
        except RuntimeError:
            # The failed rows may have partly entered the cache: drop them so a retry starts clean.
            for st_, st in zip(steps, states):
                self.ctx.seq_rm(st.slot, st_.pos, -1)
                st.n_past = min(st.n_past, st_.pos)
            raise
        now = time.monotonic()
        self._forward_count += 1
        for st_, st in zip(steps, states):
            st.n_past = st_.pos + st_.n_tokens
            st.last_used = now
            st.last_call = self._forward_count
        if self.role.last:
            return [t for i in sorted(sampled) for t in sampled[i]]
        return hidden

    def _decode_call(
        self,
        call: list[tuple[int, int, int]],
        steps: list[SeqStep],
        states: list[_SeqState],
        offsets: list[int],
        data: np.ndarray,
        hidden: np.ndarray | None,
        sampled: dict[int, list[SampledToken]],
    ) -> None:
        """One ``llama_decode`` of ``call``: (step index, first row, end row) segments, rows relative to the step."""
        # Rows go to llama.cpp sorted by slot (see slots.ubatch_order); row_src maps each sorted row to its input row
        # (a slice when the call is one sequence's rows: every decode step of a lone stream, every prompt block).
        if len(call) == 1:
            i, lo, hi = call[0]
            row_src: slice | np.ndarray = slice(offsets[i] + lo, offsets[i] + hi)
            positions = np.arange(steps[i].pos + lo, steps[i].pos + hi, dtype=np.int32)
            slots = np.full(hi - lo, states[i].slot, dtype=np.int32)
        else:
            call = sorted(call, key=lambda seg: states[seg[0]].slot)
            row_src = np.concatenate([np.arange(offsets[i] + lo, offsets[i] + hi) for i, lo, hi in call])
            positions = np.concatenate(
                [np.arange(steps[i].pos + lo, steps[i].pos + hi, dtype=np.int32) for i, lo, hi in call]
            )
            slots = np.concatenate([np.full(hi - lo, states[i].slot, dtype=np.int32) for i, lo, hi in call])
        n = len(positions)
        if self.role.last:
            # Rows to sample after: the last row of a step, or with a draft the last len(draft) + 1 rows.
            output = np.zeros(n, dtype=np.int8)
            start, outs = 0, []
            self._last_outs = outs
            for i, lo, hi in call:
                if steps[i].sample:
                    first = steps[i].n_tokens - 1 - len(steps[i].draft)
                    for r in range(max(lo, first), hi):
                        output[start + r - lo] = 1
                        outs.append((start + r - lo, i, r - first))
                start += hi - lo
        else:
            # NOTE: every row must be an output, or the last layer keeps only the flagged rows (docs/design.md,
            # mechanism 3).
            output = np.ones(n, dtype=np.int8)
        rows = data[row_src]
        self._batch.fill(
            positions,
            slots,
            output,
            tokens=rows if self.role.first else None,
            embd=None if self.role.first else rows,
        )
        if self._capture:
            self._capture.reset()
        groups = ubatch_groups(slots.tolist(), self.options.n_ubatch)
        if step_trace.ENABLED:
            step_trace.mark("decode")
        self.ctx.decode(self._batch)
        if step_trace.ENABLED:
            step_trace.mark("decode_end")
        self._decode_count += 1
        self._ubatch_count += len(groups)
        if self.role.last:
            for out_row, i, j in outs:
                got = sampled.setdefault(i, [])
                draft = steps[i].draft
                # NOTE: a verified step stops at the first sampled token that differs from the next proposal:
                # the sampler then has accepted exactly the tokens the coordinator keeps (docs/design.md,
                # "Speculative decoding"), and the rows after it are dropped by the next step.
                if len(got) == j and (j == 0 or got[-1].token == draft[j - 1]):
                    got.append(self._sample(steps[i], states[i], int(out_row)))
            return
        got = self._capture.rows()
        if got.shape[0] != n:
            raise RuntimeError(f"captured {got.shape[0]} hidden rows for {n} inputs")
        if isinstance(row_src, slice):
            # NOTE: one sequence's rows: llama.cpp computes them in order (one ubatch per n_ubatch rows).
            hidden[row_src] = got
        else:
            computed = [idx for group in groups for idx in group]
            hidden[row_src[np.asarray(computed)]] = got

    def _check(self, steps: list[SeqStep], data: np.ndarray) -> int:
        if not steps:
            raise InvalidStepError("a forward call needs at least one sequence step")
        n_rows = sum(s.n_tokens for s in steps)
        if any(s.n_tokens <= 0 for s in steps):
            raise InvalidStepError("every step needs at least one row")
        if len({s.seq_id for s in steps}) != len(steps):
            raise InvalidStepError("a sequence may appear only once per forward call")
        if any(len(s.draft) >= s.n_tokens for s in steps):
            raise InvalidStepError("a draft needs fewer proposals than the step has rows")
        if self.role.first:
            if data.dtype != np.int32 or data.shape != (n_rows,):
                raise InvalidStepError(
                    f"first stage expects int32 token ids of shape ({n_rows},), got {data.dtype} {data.shape}"
                )
            ids = data.tolist() if n_rows <= 64 else (int(data.min()), int(data.max()))  # NOTE: few: Python is faster
            if n_rows and (min(ids) < 0 or max(ids) >= self.n_vocab):
                raise InvalidStepError(f"token ids must be in [0, {self.n_vocab})")
        elif data.dtype != np.float32 or data.shape != (n_rows, self.n_embd):
            raise InvalidStepError(
                f"expected float32 hidden rows of shape ({n_rows}, {self.n_embd}), got {data.dtype} {data.shape}"
            )
        return n_rows

    def _prepare(self, steps: list[SeqStep]) -> list[_SeqState]:
        """Find or allocate each sequence's slot and rewind its KV to the step's start.

        Everything that can refuse the call (room, positions, sampler settings) is checked before any KV is
        touched: a refused call leaves every sequence as it was.
        """
        new = [s for s in steps if s.seq_id not in self._seqs]
        if len(new) > len(self._free_slots):
            raise CapacityError(f"{len(new)} new sequences but only {len(self._free_slots)} free slots")
        stepping = {s.seq_id for s in steps}
        block_ends = [self._block_end(s) for s in steps]
        for s, be in zip(steps, block_ends):
            end = s.pos + s.n_tokens
            if s.pos < be and (s.pos % BLOCK_ROWS or (end < be and end % BLOCK_ROWS)):
                raise InvalidStepError(
                    f"sequence {s.seq_id}: rows {s.pos}..{end} split a {BLOCK_ROWS}-row block below block_end {be}"
                )
        for s in steps:
            donor = self._donor(s)
            if donor is not None and s.prefix_from in stepping:
                raise InvalidStepError(f"sequence {s.seq_id} copies from {s.prefix_from}, which this call also steps")
            if s.seq_id in self._seqs:
                have = self._seqs[s.seq_id].n_past
            else:
                have = min(donor.n_past, s.pos) if donor is not None else 0
            if s.pos > have:
                raise KVMissingError(s.seq_id, have, s.pos)
            if s.pos + s.n_tokens > self.n_ctx_seq:
                raise ContextOverflowError(
                    f"sequence {s.seq_id} would reach position {s.pos + s.n_tokens}; a sequence holds {self.n_ctx_seq} here"
                )
        samplers = self._build_samplers(steps)
        mates = {self._seqs[s.seq_id].slot for s in steps if s.seq_id in self._seqs}
        # NOTE: a sequence that has not stepped since the mates' last step has left them (the coordinator keeps it
        # as a prefix-cache entry, or its release is still on the way): its slot may go to a newcomer
        # (slots.reclaimable). A sequence of another micro-batch has stepped since, between the mates' steps, and
        # is never moved. One that left with the mates' last step counts too: the next step is when a newcomer
        # usually arrives, and a stage that took it before the release would otherwise place it apart for good
        # (stages then differ: the releases reach them at different moments).
        since = min((self._seqs[s.seq_id].last_call for s in steps if s.seq_id in self._seqs), default=0)
        idle = {st.slot: q for q, st in self._seqs.items() if q not in stepping and st.last_call <= since}
        states = []
        for s, be in zip(steps, block_ends):
            state = self._seqs.get(s.seq_id)
            if state is None:
                donor = self._donor(s)  # NOTE: before the sequence enters the table (then it has no donor)
                slot = pick_slot(self._free_slots, mates)
                take = reclaimable(self._free_slots, mates, set(idle))
                if take is not None:
                    self._move(self._seqs[idle.pop(take)])
                    slot = take
                self._free_slots.remove(slot)
                mates.add(slot)
                state = self._seqs[s.seq_id] = _SeqState(slot=slot)
                self.ctx.seq_rm(state.slot)
                if donor is not None:
                    # A cached prefix: take the donor's first s.pos positions (docs/design.md, "Prefix cache").
                    self.ctx.seq_copy_all(donor.slot, state.slot)
                    self.ctx.seq_rm(state.slot, s.pos, -1)
                    state.n_past = s.pos
            elif s.pos < state.n_past:
                # A retried or replayed step: forget what this stage computed from that position on.
                self.ctx.seq_rm(state.slot, s.pos, -1)
                state.n_past = s.pos
            state.block_end = be
            if s.seq_id in samplers:
                if state.sampler:
                    state.sampler.close()
                state.params, state.sampler = samplers[s.seq_id]
            states.append(state)
        # NOTE: members that ended inside the group left free holes; moving its last members into them keeps every
        # later step of the group in fewer passes over the weights (slots.compaction), for a copy of their cells now.
        for src, dest in compaction({st.slot for st in states}, self._free_slots):
            self._relocate(next(st for st in states if st.slot == src), dest)
        return states

    def _move(self, state: _SeqState) -> None:
        """Move an idle sequence's KV to a free slot away from the others (``slots.reclaimable``); its old slot is
        free afterwards. The cells are copied exactly, so its later steps compute what they would have."""
        self._relocate(state, pick_slot(self._free_slots, set()))

    def _relocate(self, state: _SeqState, dest: int) -> None:
        """Move a sequence's KV cells, exactly, to the free slot ``dest``; its old slot is free afterwards."""
        self.ctx.seq_copy_all(state.slot, dest)
        self.ctx.seq_rm(state.slot)
        self._free_slots.remove(dest)
        self._free_slots.add(state.slot)
        state.slot = dest
        self._moves += 1

    def _block_end(self, s: SeqStep) -> int:
        """The sequence's block_end: as the step says; else kept from earlier steps; else, for a sequence that
        starts (position 0), the whole blocks of its first step (its prompt); else the donor's it copies from.
        Always 0 when a ubatch cannot hold a block (n_ubatch < 64): then every row runs in row mode."""
        if min(self.options.n_ubatch, self.options.n_batch) < BLOCK_ROWS:
            return 0
        if s.block_end is not None:
            return s.block_end
        state = self._seqs.get(s.seq_id)
        if state is not None and s.pos > 0:
            return state.block_end
        if s.pos == 0:
            return s.n_tokens // BLOCK_ROWS * BLOCK_ROWS
        donor = self._donor(s)
        return donor.block_end if donor is not None else 0

    def _donor(self, s: SeqStep) -> _SeqState | None:
        """The live sequence a new one copies its first ``s.pos`` positions from, if the step asks for one."""
        if s.prefix_from is None or s.pos == 0 or s.seq_id in self._seqs:
            return None
        return self._seqs.get(s.prefix_from)

    def _build_samplers(self, steps: list[SeqStep]) -> dict[int, tuple[SamplingParams, Sampler]]:
        """The new sampler chains this call asks for (final stage), built before anything else changes."""
        if not self.role.last:
            return {}
        built: dict[int, tuple[SamplingParams, Sampler]] = {}
        try:
            for s in steps:
                state = self._seqs.get(s.seq_id)
                if s.sampling is None and not (s.sample and (state is None or state.sampler is None)):
                    continue
                params = s.sampling or SamplingParams()
                # InvalidStepError on settings it cannot apply (a grammar llama.cpp refuses, too)
                sampler = build_sampler(params, self.n_vocab, self.model.vocab)
                built[s.seq_id] = (params, sampler)
                for k, tok in enumerate(s.accept):
                    try:
                        sampler.accept(int(tok))  # a grammar refuses a token it does not allow (GrammarError)
                    except GrammarError as exc:
                        raise InvalidStepError(f"sequence {s.seq_id}: accept[{k}]: {exc}") from None
        except BaseException:
            for _, sampler in built.values():
                sampler.close()
            raise
        return built

    def _sample(self, step: SeqStep, state: _SeqState, row: int) -> SampledToken:
        assert state.sampler is not None and state.params is not None
        try:
            token = state.sampler.sample(self.ctx, row)
        except GrammarError as exc:
            # NOTE: only this sequence is at fault; raising would fail every sequence of the batch. It ends here,
            # as if the model had stopped (nothing was accepted into its grammar, so its sampler stays usable).
            token = self._end_token()
            log.warning("sequence %d: %s; ending it", step.seq_id, exc)
        p = state.params
        if not (p.want_logprobs or p.n_logprobs):
            return SampledToken(step.seq_id, int(token))
        # NOTE: SampledToken is frozen (protocol data): compute everything, then build it.
        logits = self.ctx.logits_row(row, self.n_vocab).astype(np.float64)
        m = logits.max()
        logz = m + np.log(np.exp(logits - m).sum())
        top_logprobs = None
        if p.n_logprobs:
            top = np.argpartition(-logits, p.n_logprobs)[: p.n_logprobs]
            top = top[np.argsort(-logits[top], kind="stable")]
            top_logprobs = [(int(t), float(logits[t] - logz)) for t in top]
        return SampledToken(step.seq_id, int(token), float(logits[token] - logz), top_logprobs)

    def _end_token(self) -> int:
        """An end-of-generation token of this model (end of sequence, else end of turn)."""
        vocab = self.model.vocab
        for tok in (llama.llama_vocab_eos(vocab), llama.llama_vocab_eot(vocab)):
            if 0 <= tok < self.n_vocab:
                return int(tok)
        return 0

    def logits(self, step: int = -1, row: int = -1) -> np.ndarray:
        """Raw logits of the last ``llama_decode`` (final stage; for tests and parity checks): output row ``row``
        (-1: the last) of step ``step`` (-1: the last) of that forward call, as the call listed its steps. The
        decode got the rows sorted by slot, so the step's place in the call is not its row in the batch."""
        steps = sorted({i for _, i, _ in self._last_outs})
        if not -len(steps) <= step < len(steps):
            raise ValueError(f"no logits for step {step} in the last decode ({len(steps)} steps had outputs)")
        rows = sorted((j, batch_row) for batch_row, i, j in self._last_outs if i == steps[step])
        if not -len(rows) <= row < len(rows):
            raise ValueError(f"no logits for row {row} of step {step} in the last decode ({len(rows)} rows)")
        return self.ctx.logits_row(rows[row][1], self.n_vocab)


def plan_decodes(
    steps: list[SeqStep], states: list[_SeqState], n_batch: int, n_ubatch: int
) -> list[list[tuple[int, int, int]]]:
    """The ``llama_decode`` calls of one forward call, as (step index, first row, end row) segments.

    Every position is computed by the same kernel whatever else runs and however the work was chunked
    (docs/design.md, "Canonical prefill"): positions below the sequence's ``block_end`` (the prompt's whole
    64-row blocks) in calls of that sequence alone, aligned to whole blocks (the tiled kernel, fast); all
    others at most BLOCK_ROWS - 1 rows per sequence per call (the row kernel, as a decode step computes them).
    """
    calls: list[list[tuple[int, int, int]]] = []
    rest: list[tuple[int, int, int]] = []  # row-mode segments still to place
    # NOTE: a block call is one ubatch, so its tiles start on block boundaries (llama.cpp splits at n_ubatch).
    per_call = min(n_batch, n_ubatch) // BLOCK_ROWS * BLOCK_ROWS
    for i, (step, st) in enumerate(zip(steps, states)):
        end = step.pos + step.n_tokens
        split = min(max(st.block_end, step.pos), end) - step.pos if per_call else 0  # rows in whole blocks
        for lo in range(0, split, per_call or 1):
            calls.append([(i, lo, min(split, lo + per_call))])
        if split < step.n_tokens:
            rest.append((i, split, step.n_tokens))
    while rest:
        call, budget, left = [], n_batch, []
        for i, lo, hi in rest:
            take = min(hi - lo, BLOCK_ROWS - 1, budget)
            if take > 0:
                call.append((i, lo, lo + take))
                budget -= take
            if lo + take < hi:
                left.append((i, lo + take, hi))
        calls.append(call)
        rest = left
    return calls
