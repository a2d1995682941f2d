"""lm-evaluation-harness adaptor: any mtnlg checkpoint as lm_eval's model ``mtnlg``.

lm_eval (0.4.x, ``pip install -e '.[eval]'``) finds models in its registry, which this module fills
when it is imported (``@register_model("mtnlg")``); its own ``lm_eval`` command imports only its own
models. So run it through this module, which registers the model, then runs lm_eval's command line
with every option it has::

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python -m mtnlg.eval.harness \\
        --model mtnlg --model_args checkpoint=runs/r1 --tasks my_task --include_path tasks/

or, in Python, import it before ``lm_eval.simple_evaluate(model="mtnlg", ...)`` (or pass
``MtnlgLM(checkpoint=...)`` as the model). Without the two offline variables the ``datasets``
library makes network look-ups even for local ``dataset_path: json`` tasks.

The scoring is ``mtnlg.eval.evaluate``'s (the same tokenization of context and continuation, batching
and softmax over the real vocabulary), so a task gives the numbers ``mtnlg evaluate`` gives on the
same data. ``loglikelihood_rolling`` uses lm_eval's own rolling windows (the end-of-document token
first, every token scored once); ``generate_until`` decodes with the generation engine and cuts the
text at the first of the task's ``until`` strings, which lm_eval leaves to the model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch

from mtnlg.util.extras import missing_package_message

try:
    import lm_eval.models  # noqa: F401  (lm_eval's own models: the registry skips them once it holds ours)
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as exc:
    if exc.name != "lm_eval":
        raise
    raise ModuleNotFoundError(missing_package_message("lm_eval"), name="lm_eval") from None

from mtnlg.eval.evaluate import Scorer
from mtnlg.generate.engine import Engine
from mtnlg.generate.sequence import MAX_STOP_STRINGS, SamplingParams

DEFAULT_BATCH_SIZE = 8
log = logging.getLogger(__name__)


@register_model("mtnlg")
class MtnlgLM(LM):
    """An mtnlg checkpoint (fp32, int8, int4 or converted from HF) behind lm_eval's three request types.

    ``--model_args``: ``checkpoint`` (required), ``quantize`` (none, int8 or int4), ``tokenizer`` (a
    directory replacing the checkpoint's), ``max_gen_toks`` (default 256); lm_eval's
    ``--device`` (cpu when CUDA is missing) and ``--batch_size`` (default 8; ``auto`` means the default).
    """

    def __init__(
        self,
        checkpoint: str,
        quantize: str = "none",
        tokenizer: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        **unused: object,
    ) -> None:
        super().__init__()
        size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE  # None or "auto"
        if max_batch_size:
            size = min(size, int(max_batch_size))
        self.scorer = Scorer.from_checkpoint(str(checkpoint), quantize, _device(device), size, tokenizer, progress=True)
        self.engine = Engine(self.scorer.model, self.scorer.tokenizer, size)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per ``(context, continuation)``: the continuation's log-likelihood, and whether it is the greedy one."""
        scored = self.scorer.loglikelihood([tuple(r.args) for r in requests])  # type: ignore[misc]
        return [(s.total, bool(s.greedy.all())) for s in scored]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """Per ``(text,)``: the log-likelihood of all its tokens, the first given the end-of-document token."""
        scorer, docs, windows = self.scorer, [], []
        for request in requests:
            ids = scorer.tokenizer.encode(request.args[0])
            pairs = lm_utils.get_rolling_token_windows(ids, scorer.tokenizer.eod_id, scorer.seq_len, 1)
            doc = [scorer.pair_window(*lm_utils.make_disjoint_window(pair)) for pair in pairs]
            docs.append(len(doc))
            windows.extend(doc)
        totals = iter(s.total for s in scorer.score(windows, "rolling log-likelihood"))
        return [sum(next(totals) for _ in range(n)) for n in docs]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Per ``(context, gen_kwargs)``: the continuation, ending before the first ``until`` string."""
        prompts, params, stops = [], [], []
        for request in requests:
            context, kwargs = request.args
            until = _strings(kwargs.get("until"))
            prompts.append(context)
            params.append(self._sampling(kwargs, until))
            stops.append(until)
        completions = self.engine.generate(prompts, params, truncate=True)
        return [cut_at(c.text, until) for c, until in zip(completions, stops, strict=True)]

    def _sampling(self, kwargs: dict, until: Sequence[str]) -> SamplingParams:
        """lm_eval's generation settings as the engine's; greedy unless ``do_sample`` with a temperature."""
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        return SamplingParams(
            max_new_tokens=min(max_new, self.scorer.seq_len - 1),
            temperature=temperature,
            top_p=float(kwargs.get("top_p") or 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            stop=list(until[:MAX_STOP_STRINGS]),  # the engine stops early on these; cut_at applies them all
        )


def _device(device: str | None) -> str:
    """The device to load on: lm_eval's command line asks for cuda:0 unless told otherwise, so a machine
    without CUDA runs on the CPU instead of failing."""
    if device is None or device.startswith("cuda") and not torch.cuda.is_available():
        if device is not None:
            log.warning("%s is not available: evaluating on the CPU", device)
        return "cpu"
    return device


def _strings(until: object) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else [s for s in until if s]  # type: ignore[union-attr]


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any of the ``until`` strings."""
    cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def main() -> None:
    """``python -m mtnlg.eval.harness ARGS``: lm_eval's command line (``lm_eval ARGS``) with ``mtnlg`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
