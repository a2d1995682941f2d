"""The training loop: one loop for every layout; parallelism is applied to the model beforehand.

One optimizer step:

1. The global batch ``B`` (ramped up from a small start, MT-NLG style) is split into
   ``B / (micro_batch_size x dp)`` micro-batches per data-parallel rank. Each runs forward and
   backward under autocast with its loss divided by the micro-batch count, so the accumulated
   gradient is that of the mean loss over the whole batch. Under FSDP the gradients are reduced
   over the data-parallel ranks after the last micro-batch only; under pipeline parallelism the
   schedule (``mtnlg.parallel.pipeline.Pipeline``) runs the same micro-batches through the stages.
2. The global gradient norm is measured (fp16: after unscaling). A NaN/Inf loss or norm skips the
   step: it is counted and logged, and the weights and optimizer state stay untouched.
3. Gradients are clipped to ``grad_clip``, the LR is set from the schedule and AdamW steps.

Parameters stay fp32 (the master weights); autocast runs the matmuls in bf16 or fp16, and fp16
adds dynamic loss scaling (``torch.amp.GradScaler``). Everything a step depends on (weights,
optimizer, RNGs, data position, counters, loss scale) is checkpointed, so a resumed run continues
bitwise-identically on CPU.
"""

from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from mtnlg.checkpoint.directory import step_dir_name
from mtnlg.checkpoint.training import (
    AsyncWriter,
    ResumePoint,
    find_resume_point,
    load_training_checkpoint,
    save_training_checkpoint,
    save_training_checkpoint_async,
)
from mtnlg.checkpoint.writer import SharedMemoryError
from mtnlg.config import Config
from mtnlg.data.batch import split_batch
from mtnlg.data.gpt_dataset import Dataset, SampleLoader
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model.counts import flops_per_token
from mtnlg.model.gpt import GPT
from mtnlg.parallel.context import average_gradients, shard_batch, shard_pipeline_batch
from mtnlg.parallel.data import fsdp_mixed_precision
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.expert import ExpertStatistics
from mtnlg.parallel.pipeline import Pipeline, microbatches
from mtnlg.parallel.utils import clip_grads, grad_norm, loss_context
from mtnlg.parallel.zero import (
    finish_gradient_reduction,
    reduces_context_parallel,
    set_gradient_sync,
    sharded_gradients,
    step_gradients,
)
from mtnlg.train.limits import JobLimits, StopRequest
from mtnlg.train.metrics import MetricsLog
from mtnlg.train.optim import build_optimizer, global_batch_size, learning_rate, validate_batch_sizes
from mtnlg.train.report import AUTOCAST_DTYPES, Reporter, StepStats
from mtnlg.train.resilience import CollectiveMonitor
from mtnlg.util import dist as rank_info


@dataclass
class TrainState:
    """Progress counters; with the checkpointed tensors they fully determine the next step."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0


class Trainer:
    """Trains ``model`` on ``train_data`` (any object with ``len`` and int64 samples of seq_len + 1 tokens,
    or fine-tuning's stacked token / label / document rows: ``mtnlg.data.sft``).

    ``dims`` (the run's ``ParallelDims``; default: one process) places this process among the
    data-parallel replicas: each replica draws its share of every global batch, and its tensor-
    parallel peers read the same samples. Reductions across processes go through ``_all_reduce``.
    """

    def __init__(
        self,
        cfg: Config,
        model: GPT,
        train_data: Dataset,
        valid_data: Dataset | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        dims: ParallelDims | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg, self.tc = cfg, cfg.train
        self.dims = dims or ParallelDims(dp=1, pp=1, tp=1, world_size=1)
        dp_rank, dp_size = self.dims.dp_rank, self.dims.dp
        validate_batch_sizes(self.tc, dp_size)
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, self.tc, self.dims, cfg.parallel)
        self.micro = self.tc.micro_batch_size * dp_size  # samples per micro-batch, all dp ranks together
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.loader = SampleLoader(train_data, self.micro, dp_rank, dp_size)
        self.valid_data = valid_data
        self.state = TrainState()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.tc.precision == "fp16" else None
        self.out = Path(self.tc.out)
        self.is_main = rank_info.is_main()
        self.flops_per_token = flops_per_token(cfg.model, cfg.model.seq_len)["train"]
        self.last_saved_step = -1
        self.pipeline = Pipeline(model, self.dims, cfg) if self.dims.pp > 1 else None
        self.experts = ExpertStatistics(model, self.optimizer, self.dims)  # MoE load and bias, before each step
        self.collectives = CollectiveMonitor(self.out, cfg.parallel.timeout_s)
        self.writer = AsyncWriter.create(self.device.type == "cuda") if self.tc.async_save else None
        self.pending: Future[Path] | None = None  # the asynchronous save in flight

    # -- one step ----------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.tc.precision]
        enabled = dtype is not None and not fsdp_mixed_precision(self.cfg, self.dims)  # FSDP casts itself
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def train_step(self) -> StepStats:
        """Accumulate gradients over the global batch, then step (or skip a non-finite step)."""
        start, waited = time.perf_counter(), self.collectives.wait_seconds
        batch_size = global_batch_size(self.tc, self.state.consumed_samples)
        lr = learning_rate(self.tc, self.state.step, self.state.consumed_tokens)
        with loss_context(self.dims):  # under tp, cross-entropy runs on vocabulary shards
            if self.pipeline is not None:
                loss = self._pipeline_step(batch_size)
            else:
                loss = self._forward_backward(batch_size // self.micro)
        grad_norm = self._grad_norm()
        skipped = self._any_rank(not bool(torch.stack([loss, grad_norm]).isfinite().all()))
        if skipped:
            self.state.skipped_steps += 1
            if self.scaler is not None:
                self.scaler.update()  # backs the loss scale off
        else:
            self._optimizer_step(lr, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        tokens = batch_size * self.cfg.model.seq_len
        self.state.step += 1
        self.state.consumed_samples += batch_size
        self.state.consumed_tokens += tokens
        mean_loss = self._all_reduce(self._mean_over_cp(loss), dist.ReduceOp.SUM, self.dims.dp_group) / self.dp_size
        seconds = time.perf_counter() - start
        return StepStats(self.state.step, float(mean_loss), float(grad_norm), lr, batch_size, tokens, seconds,
                         skipped, seconds - (self.collectives.wait_seconds - waited))

    def _forward_backward(self, micro_batches: int) -> torch.Tensor:
        """Mean loss over ``micro_batches`` micro-batches of this rank; gradients accumulate in .grad."""
        total = torch.zeros((), device=self.device)
        for i in range(micro_batches):
            batch = self.loader.next_batch(self.micro).to(self.device, non_blocking=True)  # (b, T + 1)
            if self.dims.dp > 1:  # reduce gradients over data-parallel ranks once, after the last micro-batch
                set_gradient_sync(self.model, self.optimizer, i == micro_batches - 1)
            with self._autocast():
                loss = self._loss(batch)
            scaled = loss / micro_batches
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach().float()
        return total / micro_batches

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's mean loss on one micro-batch (pretraining tokens or fine-tuning samples)."""
        inputs, targets, extra = split_batch(batch)
        if self.dims.cp > 1:  # this rank's chunks of every sample's sequence, at their global positions
            inputs, targets, extra, share = shard_batch(inputs, targets, extra, self.dims.cp, self.dims.cp_rank)
            return self.model(inputs, targets, **extra) * share
        return self.model(inputs, targets, **extra)

    def _mean_over_cp(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank loss over the context-parallel ranks (equal token counts): the samples'."""
        if self.dims.cp == 1:
            return value
        return self._all_reduce(value, dist.ReduceOp.SUM, self.dims.cp_group) / self.dims.cp

    def _next_batch(self, micro_batches: int) -> torch.Tensor:
        """This rank's share of ``micro_batches`` consecutive micro-batches, as one (b, T + 1) tensor."""
        batches = [self.loader.next_batch(self.micro) for _ in range(micro_batches)]
        return torch.cat(batches).to(self.device, non_blocking=True)

    def _pipeline_step(self, batch_size: int) -> torch.Tensor:
        """The same batch as ``_forward_backward`` reads, run through the pipeline schedule."""
        assert self.pipeline is not None
        inputs, targets, forward = self._pipeline_batch(self._next_batch(batch_size // self.micro))
        with self._autocast():
            return self.pipeline.step(inputs, targets, microbatches(self.cfg, self.dp_size, batch_size), forward)

    def _pipeline_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Inputs, targets and the stages' further forward arguments of a pipeline's batch (this cp rank's part)."""
        if self.dims.cp > 1:
            return shard_pipeline_batch(batch, self.dims.cp, self.dims.cp_rank)
        inputs, targets, _ = split_batch(batch, pipeline=True)
        return inputs, targets, {}

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients (sharded DTensor gradients and pipeline stages reduced to the full norm)."""
        finish_gradient_reduction(self.optimizer)  # ZeRO 1/2: the buckets still in flight after backward
        if self.dims.cp > 1 and not reduces_context_parallel(self.optimizer):  # cp ranks reduce gradients like dp
            average_gradients(self.model, self.dims.cp_group, self.dims.cp)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = self.pipeline.counted_parameters() if self.pipeline is not None else self.model.parameters()
        norm = grad_norm(step_gradients(self.optimizer, params))
        return self.pipeline.reduce_norm(norm) if self.pipeline is not None else norm

    def _optimizer_step(self, lr: float, grad_norm: torch.Tensor) -> None:
        if 0 < self.tc.grad_clip < grad_norm:  # scaling by 1 would cost a pass over every gradient
            clip_grads(self.model.parameters(), self.tc.grad_clip, grad_norm, sharded_gradients(self.optimizer))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _all_reduce(self, value: torch.Tensor, op: Any, group: Any = None) -> torch.Tensor:
        """Combine a value over every process (a no-op in one process); the hook parallel layouts extend."""
        if rank_info.distributed():
            value = value.clone()
            dist.all_reduce(value, op=op, group=group)  # group None: every process
        return value

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._all_reduce(torch.tensor(float(flag), device=self.device), dist.ReduceOp.MAX))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first ``eval_iters`` micro-batches of ``micro_batch_size`` samples.

        The micro-batches are dealt round-robin to the data-parallel ranks, so every layout scores
        the same samples (the same ones every time) and reports the same loss. Every rank runs as
        many forward passes as the busiest (FSDP and expert parallelism talk inside forward): a
        rank with fewer real micro-batches scores the next ones with weight 0.
        """
        if self.valid_data is None or len(self.valid_data) == 0:
            return None
        size, dp = self.tc.micro_batch_size, self.dp_size
        iters = min(self.tc.eval_iters, max(1, len(self.valid_data) // size))
        per_rank = -(-iters // dp)
        loader = SampleLoader(self.valid_data, size * dp, self.dp_rank, dp)  # its micro-batch of every dp
        batches = [loader.next_batch().to(self.device) for _ in range(per_rank)]
        weights = torch.tensor([float(self.dp_rank + j * dp < iters) for j in range(per_rank)], device=self.device)
        self.model.eval()
        with self._autocast(), loss_context(self.dims):
            if self.pipeline is not None:
                inputs, targets, forward = self._pipeline_batch(torch.cat(batches))
                losses = self.pipeline.evaluate(inputs, targets, per_rank, forward)
            else:
                losses = torch.stack([self._loss(b).float() for b in batches])
        self.model.train()
        total = self._mean_over_cp((losses * weights).sum())
        return float(self._all_reduce(total, dist.ReduceOp.SUM, self.dims.dp_group) / iters)

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, weights: bool = True) -> Path:
        """Checkpoint everything the next step depends on into ``out/step_XXXXXXXX``; ``weights``: with
        the consolidated ``model.safetensors`` too (a run writes it when it ends).

        With ``train.async_save`` a save without weights returns once the state is staged and is
        committed in the background; any save first waits for the one in flight."""
        trainer_state = {
            "state": asdict(self.state),
            "loader": self.loader.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        args = (self.out, self.state.step, self.model, self.optimizer, self.cfg, self.tokenizer, trainer_state,
                self.tc.keep_last)
        self.wait_for_save()
        self.last_saved_step = self.state.step
        if self.writer is not None and not weights:
            try:
                self.pending = save_training_checkpoint_async(*args, self.writer)
                return self.out / step_dir_name(self.state.step)
            except SharedMemoryError as exc:  # on every rank: the steps so far are saved, synchronously
                if self.is_main:
                    print(f"warning: {exc}; this run saves synchronously", file=sys.stderr)
                self._close_writer()
        return save_training_checkpoint(*args, weights)

    def wait_for_save(self) -> None:
        """Wait for the asynchronous save in flight, if any (its failure is raised here)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def resume(self, point: ResumePoint | None = None) -> Path | None:
        """Continue from ``point`` (found by the caller), else from the newest good checkpoint in ``out``;
        the step directory resumed from (None if there is none)."""
        point = point or find_resume_point(self.out)
        if point is None:
            return None
        step_dir = point.step_dir
        saved = load_training_checkpoint(step_dir, self.model, self.optimizer, self.cfg, point.config)
        self.state = TrainState(**saved["state"])
        self.loader.load_state_dict(saved["loader"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.last_saved_step = self.state.step
        return step_dir

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, started: float | None = None) -> TrainState:
        """Train until ``train.steps``, validating, logging and checkpointing on their intervals.

        A job limit (``train.exit_interval`` steps, or ``train.exit_duration_mins`` since
        ``started``, a ``time.monotonic()`` value; default: now) ends this job early with a
        checkpoint and returns; the schedule still runs to ``train.steps``, so ``--resume``
        continues it and jobs split this way train exactly as one. Ctrl-C finishes the current
        step, saves a checkpoint and raises KeyboardInterrupt; SIGTERM does the same and returns
        (a preemption notice: the job ends cleanly); SIGUSR1 saves after the current step and goes on.
        An asynchronous save still in flight is waited for, however ``fit`` ends.
        """
        limits = JobLimits(self.tc, self.state.step, time.monotonic() if started is None else started)
        log = MetricsLog(self.out, self.tc.tensorboard, resume_step=self.state.step) if self.is_main else None
        reporter = Reporter(self, log)
        reason = None
        try:
            with StopRequest() as stop, self.collectives:
                if self.state.step == 0 and self.tc.eval_interval:
                    reporter.validation(self.evaluate())
                while self.state.step < self.tc.steps and reason is None:
                    reporter.step(self.train_step())
                    save_now = False
                    if self.state.step < self.tc.steps:  # a job limit reached at the last step ends nothing early
                        reason, save_now = self._stop_reason(stop, limits)
                    self._on_interval(reporter, last=self.state.step == self.tc.steps, stopping=reason is not None,
                                      save_now=save_now)
                self.wait_for_save()
        except BaseException:
            self._close_writer(quiet=True)
            raise
        finally:
            reporter.close()
        self._close_writer()
        if reason is not None:
            message = f"training stopped at step {self.state.step} ({reason}); checkpoint saved in {self.out}"
            if self.is_main:
                tqdm.write(message)
            if reason == StopRequest.REASON:
                raise KeyboardInterrupt(message)
        return self.state

    def _stop_reason(self, stop: StopRequest, limits: JobLimits) -> tuple[str | None, bool]:
        """Why this job ends after this step, if it does, and whether SIGUSR1 asked for a checkpoint:
        decided by all ranks together (any rank's signal or clock counts), so that every rank stops
        or saves after the same step, with the others."""
        flags = torch.tensor([stop.requested, stop.terminated, *limits.reached(self.state.step),
                              stop.take_save_request()], dtype=torch.float32, device=self.device)
        *stops, save_now = self._all_reduce(flags, dist.ReduceOp.MAX).tolist()
        reasons = [StopRequest.REASON, StopRequest.TERMINATED, *limits.reasons]
        return next((reason for reason, flag in zip(reasons, stops, strict=True) if flag), None), bool(save_now)

    def _close_writer(self, quiet: bool = False) -> None:
        """Wait for a save in flight; ``quiet``: another exception ends ``fit``, so its failure is only printed."""
        if self.writer is None:
            return
        try:
            self.wait_for_save()
        except Exception as exc:  # noqa: BLE001 - the exception that ended fit is the one to see
            if not quiet:
                raise
            print(f"the checkpoint being written failed too: {exc}", file=sys.stderr)
        finally:
            self.writer.close()
            self.writer = None

    def _on_interval(self, reporter: Reporter, last: bool, stopping: bool = False, save_now: bool = False) -> None:
        """Log, validate and save when due; ``last``: the final step; ``stopping``: this job ends early
        (logged and saved, not validated: validation keeps its schedule across the jobs of a run);
        ``save_now``: a checkpoint was asked for (SIGUSR1)."""
        step, tc = self.state.step, self.tc
        if step % tc.log_interval == 0 or last or stopping:
            reporter.flush()
        if tc.eval_interval and (step % tc.eval_interval == 0 or last):
            reporter.validation(self.evaluate())
        due = (tc.save_interval and step % tc.save_interval == 0) or last or stopping or save_now
        if due and step != self.last_saved_step:
            self.save(weights=last or stopping)
            if save_now and self.is_main:
                tqdm.write(f"step {step}: checkpoint saved (SIGUSR1)")
