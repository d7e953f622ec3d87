"""Runs one scheduled step: prepares the flattened batch, calls the model on the
paged KV cache, and samples.

Batch order: sequences with one token to run (decodes) first, then prefill
chunks, as AttentionMetadata requires. The only host sync of a step is reading
the sampled tokens (and logprobs, when asked for) back, and that can wait until the
next step has been launched.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention import AttentionMetadata, get_attention_backend
from pagedllm.config import EngineArgs
from pagedllm.core.interface import ModelRunnerOutput, SchedulerOutput, ScheduledRequest, TokenLogprobs
from pagedllm.distributed import SINGLE_RANK, TensorParallelGroup
from pagedllm.layers.attention import bind_kv_cache
from pagedllm.layers.parallel_sampler import MAX_SHARDED_VOCAB, RankZeroSampler, argmax_over_shards
from pagedllm.layers.sampler import DeviceTokenLogprobs, Sampler, apply_token_bitmask, token_logprobs
from pagedllm.layers.vocab_parallel import logits_table
from pagedllm.loader.model_loader import LoadedModel
from pagedllm.worker.block_tables import BlockTables
from pagedllm.worker.cuda_graphs import DecodeGraphs
from pagedllm.worker.kv_cache import allocate_kv_cache, num_blocks_for
from pagedllm.worker.request_state import RunnerRequestState
from pagedllm.worker.sampling_batch import build_sampling_batch

logger = logging.getLogger("pagedllm")


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that get logits
    sample_rows: list[tuple[int, int]]  # (index in SchedulerOutput.scheduled, row in logits) of requests that sample
    sample_states: list[RunnerRequestState]  # the same requests' states
    prompt_rows: list[tuple[str, int, int, int]]  # (request, first logits row, count, first target position)


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, args: EngineArgs, max_num_batched_tokens: int, tp: TensorParallelGroup = SINGLE_RANK
    ) -> None:
        """tp: the tensor-parallel group this runner is one rank of (the model was built for it)."""
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.config.device
        self.block_size = args.block_size
        backend_name = args.attention_backend or ("triton" if self.device.startswith("cuda") else "torch")
        self.backend = get_attention_backend(backend_name)
        use_graphs = self.device.startswith("cuda") and not args.enforce_eager
        if use_graphs and not self.backend.supports_cuda_graphs:
            raise ValueError(
                f"attention backend {self.backend.name} cannot run under CUDA graphs (it reads host-side "
                "metadata that a graph would freeze): add --enforce-eager, or use the triton backend"
            )
        self.sampler = Sampler(self.device) if tp.world_size == 1 else RankZeroSampler(Sampler(self.device), tp)
        self.tp = tp
        # TP: this rank's vocabulary ids, for steps that pick greedy tokens without the full logits
        table = logits_table(self.model) if tp.world_size > 1 else None
        sharded = table is not None and table.vocab_size <= MAX_SHARDED_VOCAB
        self.vocab_range = (table.vocab_start, table.vocab_end) if sharded else None
        self.requests: dict[str, RunnerRequestState] = {}
        max_blocks_per_seq = -(-self.config.max_model_len // self.block_size)
        self.tables = BlockTables(2 * args.max_num_seqs + 8, max_blocks_per_seq, self.device)
        self._executed: tuple[torch.Tensor, StepInputs] | None = None  # between execute_model and sample_tokens
        self._last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)  # the latest step's tokens
        self._last_sampled_rows: dict[str, int] = {}  # request -> its row in _last_sampled
        activation_bytes = 0
        if self.device.startswith("cuda"):
            activation_bytes = self._profile_run(min(max_num_batched_tokens, self.config.max_model_len), args.max_num_seqs)
        self.num_blocks = tp.min(num_blocks_for(self.config, args, activation_bytes))  # every rank: the same blocks
        self.kv_caches = allocate_kv_cache(self.config, self.block_size, self.num_blocks)
        bind_kv_cache(self.model, self.kv_caches, self.backend)
        self.graphs = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, args.max_num_seqs, self.config.max_model_len, self.block_size, self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def _profile_run(self, num_tokens: int, num_seqs: int) -> int:
        """Peak bytes of a forward at the largest step (weights excluded), measured on a
        temporary cache just big enough for it."""
        num_blocks = -(-num_tokens // self.block_size)
        caches = allocate_kv_cache(self.config, self.block_size, num_blocks)
        bind_kv_cache(self.model, caches, self.backend)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        to = lambda values: torch.tensor(values, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            query_start_loc=to([0, num_tokens]).int(),
            seq_lens=to([num_tokens]).int(),
            block_tables=torch.arange(num_blocks, device=self.device, dtype=torch.int32)[None],
            num_decodes=0, num_decode_tokens=0, max_query_len=num_tokens, max_seq_len=num_tokens,
            query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens],
        )
        hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), torch.arange(num_tokens, device=self.device), meta)
        self.model.compute_logits(hidden[:num_seqs]).float().softmax(-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del caches, hidden
        torch.cuda.empty_cache()
        return peak

    # -- one step -----------------------------------------------------------------------------
    #
    # execute_model(step N) queues the forward pass; sample_tokens() queues sampling and the
    # copy of the sampled ids to pinned host memory, and returns at once; result() waits for
    # that copy. The host can thus prepare step N + 1 while the device computes step N: a
    # request that samples in step N runs in step N + 1 on that token, which is scattered
    # into N + 1's input ids on the device (its id reaches the host one step later).

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> None:
        self._update_states(so)
        inputs = self._prepare(so.scheduled)
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        from_shards = self.vocab_range is not None and not inputs.prompt_rows and all(
            s.sampling_params.argmax_only for s in inputs.sample_states)
        logits = self.model.compute_logits(hidden[inputs.logits_indices], gather=not from_shards)
        self._executed = (logits if from_shards else logits.float(), inputs, from_shards)

    def _update_states(self, so: SchedulerOutput) -> None:
        """Apply the step's diff: dropped and new requests, appended blocks."""
        for request_id in so.dropped_request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self.tables.remove(state.row)
        for new in so.new_requests:
            self.requests[new.request_id] = RunnerRequestState.from_new(new, self.tables.add())
        for s in so.scheduled:
            if s.new_block_ids:
                self.tables.append(self.requests[s.request_id].row, s.new_block_ids)
        self.tables.sync(self._to_device)

    def _prepare(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        # Decodes first (stable, so admission order is kept within each group).
        n = len(scheduled)
        order = sorted(range(n), key=lambda i: scheduled[i].num_scheduled_tokens != 1)
        states = [self.requests[scheduled[i].request_id] for i in order]
        starts = np.fromiter((scheduled[i].num_computed_tokens for i in order), np.int64, n)
        counts = np.fromiter((scheduled[i].num_scheduled_tokens for i in order), np.int64, n)
        num_known = np.fromiter((len(st.token_ids) for st in states), np.int64, n)  # ids on the host
        num_tokens_all = np.fromiter((st.num_tokens for st in states), np.int64, n)  # with ids still on the device
        rows = np.fromiter((st.row for st in states), np.int64, n)
        ends = starts + counts
        num_decodes = int(np.count_nonzero(counts == 1))
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

        # Per token: its sequence's row, and its position in that sequence.
        row_of_token = np.repeat(np.arange(n), counts)
        positions = np.arange(num_tokens) - query_start_loc[:-1][row_of_token] + starts[row_of_token]
        # Input ids known here; a token still on the device (sampled by the step in flight) is
        # a 0 here, replaced on the device below. Such a token is always a sequence's last.
        if num_tokens == n:  # decodes only
            input_ids = np.fromiter((st.token_ids[a] if a < k else 0 for st, a, k in zip(states, starts.tolist(), num_known.tolist())), np.int64, n)
        else:
            input_ids = np.fromiter(
                itertools.chain.from_iterable(
                    st.token_ids[a:b] + [0] * (b - k) if b > k else st.token_ids[a:b]
                    for st, a, b, k in zip(states, starts.tolist(), ends.tolist(), num_known.tolist())
                ),
                np.int64,
                num_tokens,
            )
        fed = np.nonzero(ends > num_known)[0]
        slot_mapping = self.tables.host[rows[row_of_token], positions // self.block_size].astype(np.int64) * self.block_size
        slot_mapping += positions % self.block_size

        # Logits rows: each sequence whose step reaches its last token samples from its last
        # row; prompt logprobs add the rows of the prompt positions they score.
        samples = np.nonzero(ends == num_tokens_all)[0]
        prompt_rows: list[tuple[str, int, int, int]] = []
        if not any(st.sampling_params.prompt_logprobs is not None for st in states):
            logits_indices = query_start_loc[1:][samples] - 1
            sample_rows = [(order[i], j) for j, i in enumerate(samples.tolist())]
            sample_states = [states[i] for i in samples.tolist()]
        else:
            indices: list[int] = []
            sample_rows, sample_states = [], []
            for i, st in enumerate(states):
                start, end, t0 = int(starts[i]), int(ends[i]), int(query_start_loc[i])
                # Prompt logprobs: logits at position p score the token at p + 1.
                if st.sampling_params.prompt_logprobs is not None and start < st.num_prompt_tokens - 1:
                    last = min(end, st.num_prompt_tokens - 1)
                    prompt_rows.append((st.request_id, len(indices), last - start, start + 1))
                    indices.extend(range(t0, t0 + last - start))
                if end == st.num_tokens:
                    sample_rows.append((order[i], len(indices)))
                    sample_states.append(st)
                    indices.append(t0 + int(counts[i]) - 1)
            logits_indices = np.array(indices, dtype=np.int64)

        to = self._to_device
        ids = to(input_ids)
        if len(fed):
            for i in fed.tolist():
                assert states[i].num_pending == 1 and ends[i] == num_known[i] + 1, "a step runs past the known tokens"
            fed_from = np.fromiter((self._last_sampled_rows[states[i].request_id] for i in fed.tolist()), np.int64, len(fed))
            ids[to(query_start_loc[1:][fed] - 1)] = self._last_sampled[to(fed_from)]
        seq_lens = ends.astype(np.int32)
        meta = AttentionMetadata(
            slot_mapping=to(slot_mapping),
            query_start_loc=to(query_start_loc.astype(np.int32)),
            seq_lens=to(seq_lens),
            block_tables=self.tables.gather(rows, to),
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            max_query_len=int(counts.max()),
            max_seq_len=int(ends.max()),
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return StepInputs(ids, to(positions), meta, to(logits_indices), sample_rows, sample_states, prompt_rows)

    def _to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Host -> device without a sync: pinned source, non-blocking copy."""
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        if self.device == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def sample_tokens(self, grammar_bitmask: np.ndarray | None = None) -> PendingStep:
        """Sample the step just executed; grammar_bitmask has one row per scheduled request
        (SchedulerOutput.scheduled order)."""
        logits, inputs, from_shards = self._executed  # from_shards: this rank's vocabulary range only
        self._executed = None
        sampled = logprobs = None
        states = inputs.sample_states
        if states:
            if len(states) == logits.shape[0]:  # the usual case: every row samples
                sample_logits = logits
            else:
                sample_logits = logits[self._to_device(torch.tensor([row for _, row in inputs.sample_rows]))]
            if from_shards:
                assert grammar_bitmask is None, "requests with a grammar sample from the full logits"
                sampled = argmax_over_shards(sample_logits, *self.vocab_range, self.tp)
            else:
                if grammar_bitmask is not None:
                    rows = np.array([i for i, _ in inputs.sample_rows])
                    apply_token_bitmask(sample_logits, self._to_device(torch.from_numpy(np.ascontiguousarray(grammar_bitmask[rows]))))
                result = self.sampler(sample_logits, build_sampling_batch(states, self._to_device))
                sampled, logprobs = result.sampled_token_ids, result.logprobs
            self._last_sampled = sampled  # the next step's input for these requests
            self._last_sampled_rows = {st.request_id: i for i, st in enumerate(states)}
            for st in states:
                st.num_pending += 1
        prompt_logprobs = {}
        for request_id, first_row, count, target_pos in inputs.prompt_rows:
            state = self.requests[request_id]
            targets = self._to_device(torch.tensor(state.token_ids[target_pos : target_pos + count]))
            lp = logits[first_row : first_row + count].log_softmax(dim=-1)
            prompt_logprobs[request_id] = token_logprobs(lp, targets, state.sampling_params.prompt_logprobs)
        return PendingStep(self, states, sampled, logprobs, prompt_logprobs)


class PendingStep:
    """A sampled step on its way to the host: the copies are queued at construction, and
    result() waits for them (the step's one host sync)."""

    def __init__(self, runner: ModelRunner, states: list[RunnerRequestState], sampled: torch.Tensor | None,
                 logprobs: DeviceTokenLogprobs | None, prompt_logprobs: dict[str, DeviceTokenLogprobs]) -> None:
        self.runner = runner
        self.states = states
        self.sampled = _to_host(sampled) if sampled is not None else None
        self.logprobs = _host_logprobs(logprobs) if logprobs is not None else None
        self.prompt_logprobs = {rid: _host_logprobs(lp) for rid, lp in prompt_logprobs.items()}
        self.event = None
        if sampled is not None and sampled.is_cuda or any(lp.logprobs.is_cuda for lp in prompt_logprobs.values()):
            self.event = torch.cuda.Event()
            self.event.record()
        self.output: ModelRunnerOutput | None = None

    def done(self) -> bool:
        """Whether result() would return without waiting for the device."""
        return self.output is not None or self.event is None or self.event.query()

    def result(self) -> ModelRunnerOutput:
        if self.output is not None:
            return self.output
        if self.event is not None:
            self.event.synchronize()
        output = ModelRunnerOutput(sampled_token_ids={})
        if self.sampled is not None:
            requests = self.runner.requests
            for i, (state, token) in enumerate(zip(self.states, self.sampled.tolist())):
                if requests.get(state.request_id) is state:  # else dropped since (finished, preempted)
                    state.token_ids.append(token)
                    state.num_pending -= 1
                output.sampled_token_ids[state.request_id] = token
                k = state.sampling_params.logprobs
                if k is not None:
                    lp = self.logprobs
                    output.logprobs[state.request_id] = TokenLogprobs(
                        lp.token_ids[i : i + 1, : k + 1].numpy(), lp.logprobs[i : i + 1, : k + 1].numpy(), lp.ranks[i : i + 1].numpy()
                    )
        for request_id, lp in self.prompt_logprobs.items():
            output.prompt_logprobs[request_id] = TokenLogprobs(lp.token_ids.numpy(), lp.logprobs.numpy(), lp.ranks.numpy())
        self.output = output
        return output


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory, queued without waiting (pinned target) on CUDA."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _host_logprobs(lp: DeviceTokenLogprobs) -> DeviceTokenLogprobs:
    return DeviceTokenLogprobs(_to_host(lp.token_ids), _to_host(lp.logprobs), _to_host(lp.ranks))
