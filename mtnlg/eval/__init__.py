"""Evaluation of a checkpoint: the tasks and their scoring (``evaluate``), reading the task data
(``data``) and the lm-evaluation-harness adaptor (``harness``, run as ``python -m mtnlg.eval.harness``).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``, ``mtnlg.data``, ``mtnlg.generate``.
"""
