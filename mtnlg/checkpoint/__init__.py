"""Checkpoints, the one format: directories and checksums (``directory``), model files (``model``),
exact-resume training state (``training``; written in the background by ``writer``'s process),
Hugging Face conversion and upcycling (``convert``), tensors
streamed one at a time (``tensors``),
``mtnlg checkpoint inspect`` / ``export`` (``tools``).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``, ``mtnlg.data``, ``mtnlg.parallel``.
"""
