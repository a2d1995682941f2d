"""Training: the one loop (``trainer``), the one place a training model is made (``build``), the
optimizer and schedules (``optim``; Muon beside AdamW in ``muon``), signals and job limits
(``limits``), what a run shows (``report``), what keeps it going or makes its failure legible
(``resilience``), logs (``metrics``), fine-tuning's model side (``finetune``) and the run as the CLI
starts it (``run``).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``, ``mtnlg.data``, ``mtnlg.parallel``,
``mtnlg.checkpoint``.
"""
