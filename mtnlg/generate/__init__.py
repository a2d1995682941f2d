"""Text from a checkpoint: the one loader (``load``), the inference weight formats (``quantize``), the
engine and its running batch (``engine``, ``decoder``), requests and sampling (``sequence``,
``sampling``) and the terminal commands (``console``: generate, chat).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``, ``mtnlg.data``, ``mtnlg.parallel``,
``mtnlg.checkpoint``.
"""
