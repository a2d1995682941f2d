"""Data curation at scale (``mtnlg curate``): every step a pipeline of independent tasks over input
shards, run by datatrove's executors (local processes, Slurm or Ray), each task recording its
completion so that a rerun skips what is done and redoes only what failed.

``records`` reads JSONL keeping each record's other fields and writes them back; ``filters`` holds
language ID, decontamination and PII redaction; ``cluster`` turns MinHash LSH candidate pairs into
verified duplicate clusters and keeps the first document of each by a stable rule; ``tokenize``
writes Megatron ``.bin``/``.idx`` shards; ``pipeline`` wires the stages, runs them and writes the
stats.

May import: ``mtnlg.util``, ``mtnlg.config``, the rest of ``mtnlg.data``.
"""
