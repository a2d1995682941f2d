"""What the planner knows about machines: published GPU specs and the efficiency model.

Specs are the vendors' datasheet numbers per GPU (dense bf16 tensor-core peak, no sparsity;
HBM bandwidth; NVLink bandwidth per direction, i.e. half the bidirectional figure NVIDIA quotes;
the network bandwidth of one GPU's own NIC in the DGX/HGX reference systems: one 200 Gb/s HDR
InfiniBand port per A100, one 400 Gb/s NDR port per H100/H200).

The efficiency constants turn peaks into achieved rates. They are global (the same for every
model, layout and GPU), set once and never per case. The link and memory fractions are NCCL's
and STREAM's usual shares of the peak; ``gemm`` is the one constant that sets the overall speed,
chosen between the two kinds of published measurement (``CALIBRATION``, compared by
``benchmarks/plan_calibration.py``): the MT-NLG production run comes out 7-10 % faster than it
ran, NVIDIA's short benchmark runs of the same layouts (Megatron-LM papers) 8-33 % slower, so the
planner sits between a production job and a tuned benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtnlg.config import ConfigError

GIB = float(1 << 30)


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator and its links. Rates in FLOP/s and bytes/s, memory in bytes."""

    name: str
    peak_flops: float
    memory_bytes: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    # A100 SXM4 datasheet: 312 TFLOP/s bf16, 1555 / 2039 GB/s HBM2e, NVLink3 600 GB/s bidirectional.
    "a100-40gb": GpuSpec("a100-40gb", 312e12, 40 * GIB, 1555e9, 300e9, 25e9),
    "a100-80gb": GpuSpec("a100-80gb", 312e12, 80 * GIB, 2039e9, 300e9, 25e9),
    # H100 SXM5: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink4 900 GB/s bidirectional.
    "h100-80gb": GpuSpec("h100-80gb", 989e12, 80 * GIB, 3350e9, 450e9, 50e9),
    # H200 SXM: the H100's compute with 141 GB (143,771 MiB) of HBM3e at 4.8 TB/s.
    "h200": GpuSpec("h200", 989e12, 143771 * float(1 << 20), 4800e9, 450e9, 50e9),
}


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the peaks, and fixed costs. Defaults are the calibrated values.

    ``gemm``: fraction of peak FLOP/s that a large matmul reaches inside a training step (cuBLAS
    alone reaches ~0.8 of peak on A100; the step's matmuls also pay for the unfused bias adds,
    launches and synchronisation around them). A matmul whose smallest dimension is ``d`` gets
    ``gemm * d / (d + gemm_half_dim)``: tall-skinny matmuls (attention heads of 64, tiny models)
    are slower per FLOP. ``memory``: fraction of HBM bandwidth an element-wise kernel (LayerNorm,
    GELU, softmax, dropout, residual add, the optimizer step) reaches. ``nvlink`` / ``network``:
    NCCL bus bandwidth over the link's peak. ``collective_latency_s``: fixed cost of one collective
    or point-to-point transfer. ``kernel_overhead_s``: launch cost of one kernel (about 25 kernels
    per layer forward, 50 backward).
    """

    gemm: float = 0.62
    gemm_half_dim: float = 32.0
    memory: float = 0.70
    nvlink: float = 0.75
    network: float = 0.80
    collective_latency_s: float = 30e-6
    kernel_overhead_s: float = 6e-6
    memory_headroom: float = 0.10


# The published runs the defaults were checked against (step times derived from the reported
# per-GPU throughput and the paper's FLOP count, 96 B s l h^2 (1 + s/6h + V/16lh) with full
# recomputation). See benchmarks/plan_calibration.py.
CALIBRATION = (
    "Narayanan et al. 2021, Table 1 (1.7B-1T GPT on 32-3072 A100s, full recomputation)",
    "Korthikanti et al. 2022, Table 5 (22B-1T; full vs selective recomputation with sequence parallelism)",
    "Smith et al. 2022, MT-NLG 530B on 2240 / 2800 / 3360 A100s (60.1 / 50.2 / 44.4 s per step)",
)


def resolve_gpu(
    name: str | None,
    *,
    peak_tflops: float | None = None,
    memory_gb: float | None = None,
    hbm_gbps: float | None = None,
    nvlink_gbps: float | None = None,
    network_gbps: float | None = None,
    gpus_per_node: int | None = None,
    single: bool = False,
) -> GpuSpec:
    """A spec from the table, with any explicitly given figure replacing the table's.

    Without ``name`` every figure must be given (an unknown accelerator, a CPU): peak in TFLOP/s,
    memory in GiB, bandwidths in GB/s (per direction for NVLink, per GPU for the network). A
    ``single`` device talks to nobody: its link figures may be left out.
    """
    given = {
        "peak_flops": None if peak_tflops is None else peak_tflops * 1e12,
        "memory_bytes": None if memory_gb is None else memory_gb * GIB,
        "hbm_bytes_per_s": None if hbm_gbps is None else hbm_gbps * 1e9,
        "nvlink_bytes_per_s": None if nvlink_gbps is None else nvlink_gbps * 1e9,
        "network_bytes_per_s": None if network_gbps is None else network_gbps * 1e9,
        "gpus_per_node": gpus_per_node,
    }
    for key, value in given.items():
        if value is not None and not value > 0:
            raise ConfigError(f"plan: {key} must be positive, got {value}")
    if name is None:
        flags = {"peak_flops": "--peak-tflops", "memory_bytes": "--memory-gb", "hbm_bytes_per_s": "--hbm-gbps",
                 "nvlink_bytes_per_s": "--nvlink-gbps", "network_bytes_per_s": "--network-gbps"}
        if single:  # unused: one device has no links
            given = {**given, "nvlink_bytes_per_s": given["nvlink_bytes_per_s"] or 1.0,
                     "network_bytes_per_s": given["network_bytes_per_s"] or 1.0}
        missing = [flag for key, flag in flags.items() if given[key] is None]
        if missing:
            raise ConfigError(f"plan: give --gpu ({', '.join(GPUS)}) or all of {', '.join(flags.values())} "
                              f"(missing {', '.join(missing)})")
        return GpuSpec(name="custom", **{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
    if name not in GPUS:
        raise ConfigError(f"plan: unknown --gpu {name!r}; choose one of {', '.join(GPUS)} or give the figures")
    return replace(GPUS[name], **{k: v for k, v in given.items() if v is not None})
