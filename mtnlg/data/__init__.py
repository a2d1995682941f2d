"""Training data, from text to the micro-batch: the embedded corpus, the tokenizer, JSON Lines
(``jsonl``, the one reader), preprocessing into Megatron's indexed format, dedup, curation at scale
on datatrove's engines (``curate/``), merging indexed datasets (``merge``), samples, splits and
blending (``gpt_dataset``; the schedule in ``blend``), the batch contract (``batch``), instruction data for fine-tuning
(``sft``, ``instructions``) and the chat template that renders conversations (``chat_template``).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model`` (the ignored-label id).
"""
