"""Parallel layouts built on PyTorch's native stack: DeviceMesh, DTensor tensor parallelism, DCP.

Everything here takes the plain single-device model and returns it transformed; the only
distributed state is the ``ParallelDims`` built by ``init_distributed``.
"""

from mtnlg.parallel.dims import ParallelDims, destroy_distributed, init_distributed
from mtnlg.parallel.parallelize import loss_context, parallelize
from mtnlg.parallel.tensor import apply_tensor_parallel, check_tp_compatible, tp_plan

__all__ = [
    "ParallelDims",
    "apply_tensor_parallel",
    "check_tp_compatible",
    "destroy_distributed",
    "init_distributed",
    "loss_context",
    "parallelize",
    "tp_plan",
]
