"""Parallel layouts built on PyTorch's native stack: DeviceMesh, DTensor, pipelining, FSDP2, DCP.

Everything here takes the plain single-device model and returns it transformed (``parallelize``
applies them in order: pipeline stages, tensor, expert, data parallelism); the only distributed
state is the ``ParallelDims`` (``dims``) holding the mesh. ``context`` splits the sequence over
ranks (ring attention with causal load balancing). ``utils`` holds what every layout's step
needs around the model (gradient norm and clipping, the vocabulary-parallel loss); ``fp8`` swaps in
torchao's float8 linear layers for ``train.precision=fp8``.

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``.
"""
