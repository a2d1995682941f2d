# The two commands of the README. Each creates .venv on first use and installs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
TORCH_VERSION ?= 2.13.0
# The extras the README uses: dev (tests, lint, transformers), serve (HTTP server), demo (loss plot),
# eval (lm-evaluation-harness), curate (datatrove, py3langid).
EXTRAS := dev,serve,demo,eval,curate

.PHONY: demo finetune-demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: without a GPU, the CPU build from PyTorch's index (the default index
	# if that cannot be reached), so a CPU-only machine never resolves a multi-GB CUDA build.
	$(PY) tools/install_torch.py $(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mtnlg tests benchmarks

# From nothing to generated text in about 5 minutes on a 2-core CPU (see README, "The demo").
DEMO_PROMPTS := "Return a new list" "The default value of" "This module provides"

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(PY) -m mtnlg info --preset tiny
	$(PY) -m mtnlg corpus --out $(DEMO_DIR)/corpus.jsonl
	$(PY) -m mtnlg tokenizer train --input $(DEMO_DIR)/corpus.jsonl --vocab-size 8192 --out $(DEMO_DIR)/tokenizer
	$(PY) -m mtnlg preprocess --input $(DEMO_DIR)/corpus.jsonl --tokenizer $(DEMO_DIR)/tokenizer \
		--output-prefix $(DEMO_DIR)/data/python-docs
	rm -rf $(DEMO_DIR)/run
	$(PY) -m mtnlg train --preset tiny --config configs/demo.toml --tokenizer $(DEMO_DIR)/tokenizer \
		--data-path $(DEMO_DIR)/data/python-docs --out $(DEMO_DIR)/run
	@for prompt in $(DEMO_PROMPTS); do \
		echo "----- $$prompt"; \
		$(PY) -m mtnlg generate --checkpoint $(DEMO_DIR)/run --prompt "$$prompt" \
			--max-new-tokens 40 --temperature 0.7 --top-k 40 --seed 1 || exit 1; \
	done
	@echo "loss curve: $(DEMO_DIR)/run/loss.png, training log: $(DEMO_DIR)/run/log.jsonl"

# The demo's model fine-tuned to follow two instructions, then asked prompts it never saw (see
# docs/finetuning.md); a few minutes on a 2-core CPU. Runs `make demo` first if its checkpoint is missing.
SFT_PROMPTS := "reverse: file list value" "uppercase: name path" "reverse: error time data line" \
	"uppercase: string type line"

finetune-demo: $(STAMP)
	test -f $(DEMO_DIR)/run/latest || $(MAKE) demo
	$(PY) -m mtnlg corpus --instructions 3000 --exclude $(SFT_PROMPTS) --out $(DEMO_DIR)/sft.jsonl
	rm -rf $(DEMO_DIR)/sft-run
	$(PY) -m mtnlg finetune --checkpoint $(DEMO_DIR)/run --data $(DEMO_DIR)/sft.jsonl \
		--config configs/finetune-demo.toml --out $(DEMO_DIR)/sft-run
	@nl="$$(printf '\nx')"; nl="$${nl%x}"; for prompt in $(SFT_PROMPTS); do \
		echo "----- $$prompt"; \
		$(PY) -m mtnlg generate --checkpoint $(DEMO_DIR)/sft-run --temperature 0 --max-new-tokens 16 \
			--stop "<|end|>" --prompt "<|user|>$${nl}$$prompt<|end|>$${nl}<|assistant|>$${nl}" || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
