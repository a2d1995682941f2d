"""The lm-evaluation-harness adaptor: local tasks run through lm_eval (offline) and give
``mtnlg.eval.evaluate``'s numbers; generate_until applies the ``until`` strings."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch

from mtnlg.eval.data import Item
from mtnlg.eval.evaluate import Scorer, choice, perplexity

pytest.importorskip("lm_eval")

CHOICE = [
    {"context": "The quick brown", "choices": ["fox", "dozen liquor jugs"], "label": 0},
    {"context": "Pack my box with five", "choices": ["dozen", "lazy dogs", "fox"], "label": 2},
    {"context": "over the lazy", "choices": ["dog", "box"], "label": 1},
    {"context": "jumps", "choices": ["over", "with five dozen"], "label": 0},
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.", "fox dog"]
CHOICE_YAML = """task: mtnlg_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
ROLLING_YAML = """task: mtnlg_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory, small_tokenizer):
    """lm_eval imported offline (its ``datasets`` cache in a temporary HF_HOME), a random checkpoint
    and a folder with the two local tasks."""
    root = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(root / "hf"))):
            mp.setenv(name, value)
        import lm_eval
        from lm_eval.tasks import TaskManager

        import mtnlg.eval.harness as adaptor

        yield lm_eval, TaskManager, adaptor, _checkpoint(root, small_tokenizer), _tasks(root)


def _checkpoint(root, tokenizer):
    from mtnlg.checkpoint.model import save_model
    from mtnlg.config import Config, ModelConfig
    from mtnlg.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layers=2, hidden=32, n_heads=2, init_std=0.3)
    return save_model(root / "ckpt", GPT(cfg), Config(model=cfg), tokenizer)


def _tasks(root):
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows, yaml in (("choice", CHOICE, CHOICE_YAML), ("rolling", [{"text": t} for t in TEXTS], ROLLING_YAML)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tasks / f"{name}.yaml").write_text(yaml.replace("DATA", str(data)), encoding="utf-8")
    return tasks


def test_simple_evaluate_matches_mtnlg_evaluate(harness):
    lm_eval, TaskManager, adaptor, ckpt, tasks = harness
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model="mtnlg", model_args=f"checkpoint={ckpt}", batch_size=3,
                                  tasks=["mtnlg_choice", "mtnlg_rolling"], task_manager=manager)
    results = out["results"]
    scorer = Scorer.from_checkpoint(ckpt)
    expected = choice(scorer, [Item(r["context"], tuple(r["choices"]), r["label"]) for r in CHOICE])
    assert 0 < expected["acc"] < 1  # the comparison means something
    assert results["mtnlg_choice"]["acc,none"] == pytest.approx(expected["acc"])
    assert results["mtnlg_choice"]["acc_norm,none"] == pytest.approx(expected["acc_norm"])
    ppl = perplexity(scorer, TEXTS, prepend_eod=True)  # lm_eval's rolling log-likelihood scores every token
    assert results["mtnlg_rolling"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-5)


def test_command_line_finds_the_model(harness, tmp_path, monkeypatch, capsys):
    lm_eval, TaskManager, adaptor, ckpt, tasks = harness
    # The command line indexes lm_eval's thousands of built-in tasks (~14 s of CPU); only the local ones here.
    monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))
    monkeypatch.setattr(sys, "argv", ["python -m mtnlg.eval.harness", "--model", "mtnlg", "--model_args",
                                      f"checkpoint={ckpt}", "--tasks", "mtnlg_choice", "--include_path",
                                      str(tasks), "--output_path", str(tmp_path / "out")])
    adaptor.main()
    assert "mtnlg_choice" in capsys.readouterr().out
    [written] = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(written.read_text())["results"]["mtnlg_choice"]["acc,none"]
    scorer = Scorer.from_checkpoint(ckpt)
    assert acc == choice(scorer, [Item(r["context"], tuple(r["choices"]), r["label"]) for r in CHOICE])["acc"]


def test_generate_until_cuts_at_the_until_strings(harness):
    lm_eval, TaskManager, adaptor, ckpt, tasks = harness
    from lm_eval.api.instance import Instance

    lm = adaptor.MtnlgLM(checkpoint=str(ckpt))

    def generate(until: list[str]) -> str:
        request = Instance("generate_until", {}, ("The quick brown", {"until": until, "max_gen_toks": 12}), 0)
        return lm.generate_until([request])[0]

    full = generate([])
    assert len(full) > 6
    stop = full[4:6]
    cut = full[: full.find(stop)]
    assert generate([stop]) == cut
    assert generate(["\x00a", "\x00b", "\x00c", "\x00d", stop]) == cut  # more strings than the engine takes


def test_the_old_module_path_says_where_the_adaptor_went() -> None:
    done = subprocess.run([sys.executable, "-m", "mtnlg.eval_harness", "--model", "mtnlg"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "renamed to `python -m mtnlg.eval.harness`" in done.stderr
