"""Step time of a layout: matmuls, element-wise passes and communication, per pipeline slot.

One slot is the forward and backward of one micro-batch on the busiest pipeline rank. A step runs
``m + (pp - 1) / v`` slots (the 1F1B / interleaved bubble, Narayanan et al. 2021), then the
data-parallel gradient reduction that the last micro-batch's backward could not hide, then the
optimizer. Within a slot nothing overlaps: Megatron's tensor-parallel all-reduces and pipeline
sends are on the critical path. Context parallelism: a rank computes its s / cp queries against
all s keys, and the key/value blocks passed around the ring overlap the attention core; only the
transfer time beyond it shows (``context_parallel_comm``), plus the gradients' all-reduce over cp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mtnlg.config import ModelConfig
from mtnlg.planner.hardware import Efficiency, GpuSpec
from mtnlg.planner.layout import Layout, layers_per_rank, local_seq_len, step_bubble_slots
from mtnlg.planner.memory import STATE_BYTES, rank_parameters

FORWARD_KERNELS_PER_LAYER = 25
# Bytes the optimizer step moves per parameter (Adam: read and write master weights and both
# moments, read the gradient, write the 16-bit copy).
OPTIMIZER_TRAFFIC = {"bf16": 30, "fp16": 30, "fp32": 28}


@dataclass
class StepTime:
    """Seconds per optimizer step, by part (``step`` is their sum)."""

    compute: float
    bubble: float
    tensor_parallel_comm: float
    pipeline_comm: float
    data_parallel_comm: float
    optimizer: float
    context_parallel_comm: float = 0.0

    @property
    def step(self) -> float:
        return (self.compute + self.bubble + self.tensor_parallel_comm + self.pipeline_comm
                + self.data_parallel_comm + self.optimizer + self.context_parallel_comm)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "step": self.step}


class _Costs:
    """Time of the pieces on one GPU: matmuls, memory-bound passes, collectives."""

    def __init__(self, gpu: GpuSpec, eff: Efficiency) -> None:
        self.gpu, self.eff = gpu, eff

    def gemm(self, m: float, n: float, k: float, count: float = 1.0) -> float:
        """``count`` matmuls (m x k) @ (k x n): 2mnk FLOPs each at the size-dependent efficiency."""
        d = min(m, n, k)
        rate = self.gpu.peak_flops * self.eff.gemm * d / (d + self.eff.gemm_half_dim)
        return count * 2 * m * n * k / rate

    def memory(self, nbytes: float) -> float:
        return nbytes / (self.gpu.hbm_bytes_per_s * self.eff.memory)

    def link(self, ranks: int) -> float:
        """Bus bandwidth of a group of ``ranks`` consecutive GPUs: NVLink inside a node, else the NIC."""
        if ranks <= self.gpu.gpus_per_node:
            return self.gpu.nvlink_bytes_per_s * self.eff.nvlink
        return self.gpu.network_bytes_per_s * self.eff.network

    def all_reduce(self, nbytes: float, ranks: int, span: int | None = None) -> float:
        """Ring all-reduce: each GPU sends 2 (n - 1) / n of the buffer (``span``: GPUs the group covers)."""
        if ranks == 1:
            return 0.0
        return 2 * (ranks - 1) / ranks * nbytes / self.link(span or ranks) + self.eff.collective_latency_s

    def gather(self, nbytes: float, ranks: int, span: int | None = None) -> float:
        """All-gather or reduce-scatter of a buffer of ``nbytes`` (the unsharded size): (n - 1) / n of it."""
        return 0.0 if ranks == 1 else self.all_reduce(nbytes, ranks, span) / 2


def layer_times(cfg: ModelConfig, lay: Layout, c: _Costs) -> tuple[float, float, float, float]:
    """(forward compute, attention-core forward, element-wise forward, tp comm per forward) of one
    layer and one micro-batch on one tp rank. Backward costs twice the compute of forward."""
    s, b, h, a, t, e = local_seq_len(cfg, lay), lay.micro_batch, cfg.hidden, cfg.n_heads, lay.tp, lay.element_bytes
    f, d, rows, keys = cfg.ffn_size, cfg.head_dim, s * b, cfg.seq_len  # keys: every rank's, under cp
    matmuls = (c.gemm(rows, 3 * h / t, h) + c.gemm(rows, h, h / t)
               + c.gemm(rows, f / t, h) + c.gemm(rows, h, f / t))
    core = c.gemm(s, keys, d, b * a / t) + c.gemm(s, d, keys, b * a / t)
    sp = t if lay.sequence_parallel else 1
    sbh = s * b * h
    # LayerNorms, residual adds (+ dropout) read and write the residual stream (replicated without
    # SP); bias + GELU pass over the fc1 output; the unfused softmax reads and writes the scores.
    traffic = e * sbh * (12 / sp + 4 * (f / h) / t)
    if lay.cp > 1:  # the ring's fp32 scores, probabilities and merges: unfused
        traffic += 4 * 4 * a * s * keys * b / t
    elif not lay.flash_attention:
        traffic += (4 if cfg.dropout > 0 else 2) * e * a * s * s * b / t
    elementwise = c.memory(traffic) + FORWARD_KERNELS_PER_LAYER * c.eff.kernel_overhead_s
    comm = 2 * c.all_reduce(e * sbh, t)  # one after attention, one after the MLP (SP: AG + RS, same bytes)
    return matmuls + core, core, elementwise, comm


def head_time(cfg: ModelConfig, lay: Layout, c: _Costs) -> float:
    """Forward + backward of the output layer and the fp32 cross-entropy on the last rank."""
    rows, v = local_seq_len(cfg, lay) * lay.micro_batch, cfg.padded_vocab_size / lay.tp
    return 3 * c.gemm(rows, v, cfg.hidden) + 3 * c.memory(3 * 4 * rows * v)


def slot_times(cfg: ModelConfig, lay: Layout, c: _Costs) -> tuple[float, float, float]:
    """(compute, tp comm, pp comm) of one slot: forward + backward (+ recomputation) of one
    micro-batch on the busiest rank: its layers and the output layer (the last rank)."""
    compute, core, elementwise, comm = layer_times(cfg, lay, c)
    forward = compute + elementwise
    per_layer = 3 * forward
    tp = 2 * comm
    if lay.recompute == "full":
        per_layer += forward
        tp += comm
    elif lay.recompute == "selective":
        per_layer += core
    layers = layers_per_rank(cfg, lay)
    head = head_time(cfg, lay, c)
    work = layers * per_layer + head
    pp = 0.0
    if lay.pp > 1:
        # An activation forward and its gradient backward cross each stage boundary per virtual stage;
        # with scatter/gather (Megatron) or SP each tp rank sends its 1/t share.
        nbytes = lay.element_bytes * local_seq_len(cfg, lay) * lay.micro_batch * cfg.hidden / lay.tp
        # Neighbouring stages are tp * cp * dp ranks apart (rank order tp, cp, dp, pp).
        link = c.link(2 * lay.tp * lay.cp * lay.dp)
        pp = 2 * lay.virtual_stages * (nbytes / link + c.eff.collective_latency_s)
    return work, layers * tp, pp


def ring_exposed(cfg: ModelConfig, lay: Layout, c: _Costs) -> float:
    """Ring-attention transfer of one slot beyond the attention core it overlaps, on the busiest rank.

    Forward: cp - 1 steps, each sending the key and value blocks (expanded to every head, split by
    tp); backward: cp steps sending them with their fp32 gradients. The ring spans cp x tp GPUs."""
    if lay.cp == 1:
        return 0.0
    _, core, _, _ = layer_times(cfg, lay, c)
    block = local_seq_len(cfg, lay) * lay.micro_batch * cfg.hidden / lay.tp  # elements of k (or v)
    link = c.link(lay.cp * lay.tp)
    forward = (lay.cp - 1) * (2 * lay.element_bytes * block / link + c.eff.collective_latency_s)
    backward = lay.cp * (2 * (lay.element_bytes + 4) * block / link + c.eff.collective_latency_s)
    passes = 2 if lay.recompute != "none" else 1  # recomputation runs the forward ring again
    exposed = passes * max(0.0, forward - core) + max(0.0, backward - 2 * core)
    return layers_per_rank(cfg, lay) * exposed


def step_time(cfg: ModelConfig, lay: Layout, gpu: GpuSpec, eff: Efficiency) -> StepTime:
    """Predicted seconds per optimizer step (see the module docstring)."""
    c = _Costs(gpu, eff)
    work, tp, pp = slot_times(cfg, lay, c)
    m, slot = lay.microbatches, work + tp + pp
    params = rank_parameters(cfg, lay, first=True, last=lay.pp == 1)
    ring = ring_exposed(cfg, lay, c)
    return StepTime(
        compute=m * work,
        bubble=step_bubble_slots(lay) * (slot + ring),
        tensor_parallel_comm=m * tp,
        pipeline_comm=m * pp,
        data_parallel_comm=_data_parallel(cfg, lay, c, params, work),
        optimizer=c.memory(params * OPTIMIZER_TRAFFIC[lay.precision] / (lay.dp if lay.zero else 1)),
        context_parallel_comm=m * ring + _context_parallel_gradients(cfg, lay, c, params),
    )


def _context_parallel_gradients(cfg: ModelConfig, lay: Layout, c: _Costs, params: float) -> float:
    """The gradients' all-reduce over the cp ranks after the data-parallel reduction (exposed): whole
    gradients, or the dp shard under ZeRO 2/3; the cp group spans cp x tp GPUs."""
    if lay.cp == 1:
        return 0.0
    grad_bytes = params * STATE_BYTES[lay.precision][1] / (lay.dp if lay.zero >= 2 else 1)
    return c.all_reduce(grad_bytes, lay.cp, lay.cp * lay.tp)


def _data_parallel(cfg: ModelConfig, lay: Layout, c: _Costs, params: float, slot_work: float) -> float:
    """Exposed data-parallel communication per step.

    Gradients are reduced in their stored precision (fp32 main grads under mixed precision): an
    all-reduce without ZeRO, a reduce-scatter plus an all-gather of the updated 16-bit weights with
    ZeRO-1/2. Without a pipeline the reduction overlaps the last micro-batch's backward (two thirds
    of a slot); under pp it starts after the pipeline flush (Megatron, DeepSpeed), fully exposed.
    ZeRO-3 also all-gathers every layer's weights in forward and backward of every micro-batch,
    prefetched behind the compute: only what exceeds the compute shows.
    """
    if lay.dp == 1:
        return 0.0
    dp, span = lay.dp, lay.dp * lay.cp * lay.tp
    grad_bytes = params * STATE_BYTES[lay.precision][1]
    if lay.zero == 0:
        reduce = c.all_reduce(grad_bytes, dp, span)
    else:
        reduce = c.gather(grad_bytes, dp, span) + c.gather(params * lay.element_bytes, dp, span)
    hidden = 2 / 3 * slot_work if lay.pp == 1 else 0.0
    exposed = max(0.0, reduce - hidden)
    if lay.zero >= 3:
        passes = 3 if lay.recompute == "full" else 2
        gathers = passes * c.gather(params * lay.element_bytes, dp, span)
        exposed += lay.microbatches * max(0.0, gathers - slot_work)
    return exposed
