"""Tensor and sequence parallelism for the GPT: a plan keyed by module path, applied by DTensor.

Megatron's tensor slicing (Shoeybi et al. 2019) with sequence parallelism (Korthikanti et al.
2022), expressed as PyTorch ``ParallelStyle``s over a 1-D tensor-parallel mesh of ``t`` ranks.
The model code is untouched: each style shards a module's parameters and converts its inputs
and outputs at the module boundary. Notation: X activations (B, T, C), A a weight, ``t`` ranks.

Attention (per block)
    ``attn.qkv_proj``  column-parallel: Y = X A with A = [A_1 ... A_t] split by output columns,
                       rank r computes Y_r = X A_r. The fused rows are grouped per head
                       ([q_h; k_h; v_h]; with grouped-query attention per key/value head g,
                       [q of its R query heads; k_g; v_g]), so each rank owns whole heads and
                       runs attention on them alone (the model reads the head count from shapes).
                       Hence n_kv_heads % t == 0 (checked); QK-norm weights are shared by all heads.
    ``attn.out_proj``  row-parallel: Y = sum_r Y_r A_r with A split by input rows; the partial
                       sums are all-reduced (or reduce-scattered under sequence parallelism).
MLP (per block)
    ``mlp.fc_in``      column-parallel (GELU is elementwise, so it applies to each shard); SwiGLU's
                       ``mlp.fc_gate`` too (silu(gate) * up is elementwise);
    ``mlp.fc_out``     row-parallel, partial sums reduced as above.
    One all-reduce forward and one backward per sub-layer: Megatron's f and g operators.
Embeddings and output
    ``wte``            vocab-parallel: rank r holds rows [r V/t, (r+1) V/t) of the table; ids
                       outside its range give zeros and the partial embeddings are summed.
    ``lm_head``        column-parallel over the vocabulary, its weight tied to ``wte``'s (both are
                       split by vocabulary rows, so one DTensor serves both). With ``loss_parallel``
                       the logits stay split by vocabulary and cross-entropy is computed from
                       per-rank max / sum-exp / target-logit reductions: the (B, T, V) logits are
                       never gathered.
    ``wpe``            replicated (positions are few); its output is sliced by sequence under SP.
Sequence parallelism (optional)
    Between sub-layers the residual stream is split along the sequence, (B, T/t, C) per rank:
    LayerNorms and residual dropouts run on 1/t of the tokens; the all-reduce of each row-parallel
    output becomes a reduce-scatter and the input of each column-parallel layer an all-gather
    (same bytes, 1/t of the activation memory).
Replicated parameters (LayerNorms, biases of row-parallel layers, ``wpe``) become ``Replicate``
DTensors too, so optimizers, gradient clipping and checkpoints see one kind of tensor.

Dropout: ranks must draw the same mask where activations are replicated and independent masks
where they are sharded (attention probabilities of different heads; every activation under SP).
``ShardedRegionRNG`` moves the default generator to a per-rank stream inside sharded regions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from mtnlg.config import ConfigError, ModelConfig


class ReplicateParallel(ParallelStyle):
    """A module kept whole on every rank, its parameters ``Replicate`` DTensors (torchtitan's NoParallel).

    Inputs arrive as full local tensors; the output leaves in ``output_layout`` as a local tensor
    (``Shard(1)`` hands the rank its slice of the sequence, with an all-gather in backward).
    """

    def __init__(self, output_layout: Placement | None = None, input_layout: Placement | None = None) -> None:
        super().__init__()
        self.output_layout = output_layout or Replicate()
        self.input_layout = input_layout or Replicate()

    def _prepare_input(self, module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(
            DTensor.from_local(x, mesh, [self.input_layout], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def _prepare_output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        return output.redistribute(placements=[self.output_layout]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # No partition function: distribute_module replicates every parameter (broadcast from rank 0).
        return distribute_module(module, device_mesh, None, self._prepare_input, self._prepare_output)


def check_tp_compatible(cfg: ModelConfig, tp: int, sequence_parallel: bool = False) -> None:
    """Raise a ConfigError naming the field when the model cannot be split ``tp`` ways."""
    if tp == 1:
        return
    if cfg.n_heads % tp:
        raise ConfigError(
            f"model.n_heads={cfg.n_heads} is not divisible by parallel.tp={tp}: each tensor-parallel "
            "rank must own whole attention heads"
        )
    if cfg.kv_heads % tp:
        raise ConfigError(
            f"model.n_kv_heads={cfg.kv_heads} is not divisible by parallel.tp={tp}: each tensor-parallel rank "
            "must own whole key/value heads (use a tp that divides model.n_kv_heads)"
        )
    if cfg.ffn_size % tp:
        raise ConfigError(
            f"the MLP width {cfg.ffn_size} (model.ffn_hidden) is not divisible by parallel.tp={tp}"
        )
    if cfg.padded_vocab_size % tp:
        raise ConfigError(
            f"the padded vocabulary {cfg.padded_vocab_size} is not divisible by parallel.tp={tp}: set "
            f"model.padded_vocab_multiple to a multiple of {tp} (Megatron pads to 128 x tp)"
        )
    if sequence_parallel and cfg.seq_len % tp:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence: model.seq_len={cfg.seq_len} must be "
            f"divisible by parallel.tp={tp}"
        )


def tp_plan(sequence_parallel: bool, loss_parallel: bool, cfg: ModelConfig | None = None) -> dict[str, ParallelStyle]:
    """The GPT's tensor-parallel plan: module path (``*`` = every block) -> ParallelStyle."""
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    norm: ParallelStyle = SequenceParallel() if sequence_parallel else ReplicateParallel()
    plan: dict[str, ParallelStyle] = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "wpe": ReplicateParallel(output_layout=stream),
        "blocks.*.ln_1": norm,
        "blocks.*.attn.qkv_proj": ColwiseParallel(),
        "blocks.*.attn.out_proj": RowwiseParallel(output_layouts=stream),
        "blocks.*.ln_2": norm,
        "blocks.*.mlp.fc_in": ColwiseParallel(),  # SwiGLU's up projection
        "blocks.*.mlp.fc_gate": ColwiseParallel(),  # SwiGLU's gate, split like fc_in: silu(gate) * up is elementwise
        "blocks.*.mlp.fc_out": RowwiseParallel(output_layouts=stream),
        "ln_f": norm,
        "lm_head": ColwiseParallel(
            input_layouts=stream,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if cfg is not None and cfg.mlp != "swiglu":
        del plan["blocks.*.mlp.fc_gate"]
    if cfg is not None and cfg.qk_norm:  # per-head norms see this rank's heads (B, T, H/t, D): shared weights
        for name in ("q_norm", "k_norm"):  # whose gradient sums over the ranks' heads
            plan[f"blocks.*.attn.{name}"] = ReplicateParallel(output_layout=Shard(2), input_layout=Shard(2))
    if sequence_parallel:  # gather the sequence before the column-parallel layers of each sub-layer
        plan["blocks.*.attn"] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None, None),  # (x, layer, kv_cache, attn_mask, rope)
            desired_input_layouts=(Replicate(), None, None, None, None),
            use_local_output=True,
        )
        plan["blocks.*.mlp"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    return plan


class ShardedRegionRNG:
    """Runs the dropout of sharded regions on a per-rank stream of the default generator.

    Outside these regions every tensor-parallel rank keeps the same generator state, so masks
    on replicated activations agree. Entering a region draws one number from that shared stream
    (the same on every rank) and reseeds the generator with it plus the rank; leaving restores
    the shared state. Activation checkpointing replays both steps exactly, since it restores
    the generator it saw on entry to a block.
    """

    def __init__(self, generator: torch.Generator, tp_rank: int) -> None:
        self.generator = generator
        self.tp_rank = tp_rank
        self._shared_state: torch.Tensor | None = None

    def enter(self, module: nn.Module, *_: Any) -> None:
        if not module.training:
            return
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        self._shared_state = self.generator.get_state()
        self.generator.manual_seed(seed + self.tp_rank)

    def exit(self, module: nn.Module, *_: Any) -> None:
        if self._shared_state is not None:
            self.generator.set_state(self._shared_state)
            self._shared_state = None

    def install(self, model: nn.Module, sequence_parallel: bool) -> None:
        """Under SP every dropout acts on a sequence shard; otherwise only attention's (qkv to out_proj).

        Hooks go on the blocks and the embedding dropout, not the whole model, so they also run
        when a pipeline stage (a view sharing these modules) is called instead of the model.
        """
        blocks = list(model.blocks.values())  # type: ignore[union-attr]
        if sequence_parallel:
            for module in [model.drop, *blocks] if model.wte is not None else blocks:  # type: ignore[list-item]
                module.register_forward_pre_hook(self.enter)
                module.register_forward_hook(self.exit)
            return
        for block in blocks:
            block.attn.qkv_proj.register_forward_hook(self.enter)
            block.attn.out_proj.register_forward_pre_hook(self.exit)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    return torch.default_generator


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool
) -> nn.Module:
    """Shard ``model`` (a ``GPT``) in place over ``tp_mesh`` by ``tp_plan``; returns it."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    check_tp_compatible(cfg, tp_mesh.size(), sequence_parallel)
    converted = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")}
    converted.discard("Linear")
    if converted:
        raise TypeError(
            f"tensor parallelism shards nn.Linear layers, but this model has {sorted(converted)}: "
            "parallelize the plain model (mtnlg.checkpoint.model.load_model) before any inference conversion"
        )
    plan = {path: style for path, style in tp_plan(sequence_parallel, loss_parallel, cfg).items()
            if getattr(model, path.split(".")[0], None) is not None}  # a pipeline stage holds only some parts
    parallelize_module(model, tp_mesh, plan)
    model.tie_weights()  # type: ignore[operator]  # each style distributed its own copy; share wte's again
    if loss_parallel:
        model.register_forward_pre_hook(_require_loss_parallel, with_kwargs=True)
        model.register_forward_hook(_local_loss)
    if sequence_parallel:
        model.register_forward_pre_hook(_sequence_divisibility_check(tp_mesh.size()))
    if cfg.dropout > 0:
        device = torch.device(tp_mesh.device_type)
        ShardedRegionRNG(_default_generator(device), tp_mesh.get_local_rank()).install(
            model, sequence_parallel
        )
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(
            f"the tensor-parallel plan misses parameters {plain[:5]}: add their modules to tp_plan"
        )
    return model


def _require_loss_parallel(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Fail clearly, instead of deep inside DTensor, when a loss is asked for outside loss_parallel."""
    targets = kwargs.get("targets", args[1] if len(args) > 1 else None)
    handlers = getattr(getattr(DTensor, "_op_dispatcher", None), "_custom_op_handlers", None)
    if (
        targets is not None
        and handlers is not None
        and torch.ops.aten.nll_loss_forward.default not in handlers
    ):
        raise RuntimeError(
            "this tensor-parallel model computes its loss vocabulary-parallel: run its forward and backward "
            "inside `with mtnlg.parallel.loss_context(dims):` (torch's loss_parallel())"
        )


def _local_loss(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """The loss leaves the model as a plain tensor (the same on every rank); logits stay sharded.

    Its backward still runs through the DTensor graph, so it must happen under ``loss_parallel``.
    """
    if isinstance(output, DTensor) and output.ndim == 0:
        return output.to_local()
    return output


def _sequence_divisibility_check(tp: int) -> Any:
    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        T = args[0].shape[1]
        if T % tp:
            raise ValueError(
                f"sequence parallelism splits the {T} tokens of a batch {tp} ways: T must be a multiple"
            )

    return check
