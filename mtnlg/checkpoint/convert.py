"""Checkpoints to and from Hugging Face directories (GPT-2 and the Llama family: Llama, Mistral, Qwen 2,
Qwen 3; the name tables are ``mtnlg.model.hf``'s), and a dense checkpoint turned into a mixture-of-experts
one (``upcycle``).

Conversion streams tensor by tensor: each output tensor is read (``safe_open``, sharded directories
through ``model.safetensors.index.json``), converted and written before the next is read, so peak memory
is a few tensors (a fused q/k/v), not the model. A damaged HF directory is refused before anything is
written, in one line naming the file and what is wrong (missing or unused tensors, wrong shapes, a
config.json with fewer layers than the weights). Every output directory is written atomically: a failed
conversion leaves nothing half-written.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from mtnlg.checkpoint.directory import WEIGHTS_FILE, CheckpointError, resolve_verified, write_checksums
from mtnlg.checkpoint.model import load_config, load_model, save_model, write_model_files
from mtnlg.checkpoint.model import load_tokenizer as stored_tokenizer
from mtnlg.checkpoint.output import HF, MODEL, check_output
from mtnlg.checkpoint.tensors import TensorSource, hf_source, write_streaming
from mtnlg.config import Config, ConfigError, apply_settings
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.model import hf
from mtnlg.model.gpt import GPT
from mtnlg.util.fs import atomic_dir, read_json, write_json

HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
    """A tokenizer for a model with ``vocab_size`` token ids: each id it produces needs an embedding row."""
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"only {vocab_size}: it is another model's tokenizer")
    return tokenizer


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()


def read_hf_config(hf_dir: Path) -> tuple[str, Config]:
    """The model_type and Config of an HF directory's ``config.json``; a bad one is a one-line error."""
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    hf_cfg = read_json(cfg_path)
    model_type = hf_cfg.get("model_type", "gpt2")
    if model_type not in hf.FAMILIES:
        raise ValueError(f"{cfg_path}: model_type {model_type!r} is not supported ({', '.join(hf.FAMILIES)}); "
                         f"it is not gpt2 or a Llama-family model")
    try:
        return model_type, Config(model=hf.model_config_from_hf(hf_cfg)).validate()
    except KeyError as exc:
        raise ValueError(f"{cfg_path}: missing {exc.args[0]!r}") from None
    except (ValueError, ConfigError) as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None


def _check_hf_weights(source: TensorSource, cfg: Config, model_type: str, expected: dict[str, torch.Size]) -> None:
    """Refuse, in one line naming the weights file, tensors missing, unused or of the wrong shape."""
    names = {n for n in source.names() if not n.endswith(hf.IGNORED_SUFFIXES)}
    if model_type == "gpt2":  # GPT-2 files may omit the "transformer." prefix
        names = {n if n.startswith(("transformer.", "lm_head")) else f"transformer.{n}" for n in names}
    if cfg.model.tie_embeddings:
        names.discard("lm_head.weight")  # a tied model may store its output layer too
    missing, unused = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unused:
        layers = {int(n.split(".")[2]) for n in names if n.startswith(("model.layers.", "transformer.h."))}
        hint = ""
        if layers and max(layers) + 1 != cfg.model.n_layers:
            hint = f"; config.json says {cfg.model.n_layers} layers but the weights have {max(layers) + 1}"
        found = (("missing", missing), ("unused", unused))
        parts = [f"{what} {len(which)} tensors {which[:6]}" for what, which in found if which]
        raise CheckpointError(f"{source.label}: does not fit config.json: {', '.join(parts)}{hint}")
    for name, shape in expected.items():
        got = source.shape(name)
        if got != shape:
            raise CheckpointError(f"{source.label}: {name} has shape {list(got)}, config.json implies {list(shape)}")


def _meta_state(cfg: Config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        state = GPT(cfg.model).state_dict()
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def from_hf(
    hf_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Import a local HF directory (GPT-2, Llama, Mistral, Qwen 2/3) into an mtnlg checkpoint directory, with
    the tokenizer of ``tokenizer_dir`` or else HF_DIR's own (none when neither is given: see
    ``mtnlg generate --tokenizer``) and HF_DIR's tokenizer_config.json (its chat template) beside it."""
    check_output(out_dir, MODEL, [hf_dir, tokenizer_dir], overwrite)
    hf_dir = Path(hf_dir)
    model_type, cfg = read_hf_config(hf_dir)
    meta = _meta_state(cfg)
    rows = hf.plan(cfg.model, model_type, set(meta))
    expected = {}
    for name, hfs, kind in rows:  # the HF shapes this config implies: the export of a meta model
        expected.update(zip(hfs, (t.shape for t in hf.to_hf(kind, meta[name], cfg.model)), strict=True))
    source = hf_source(hf_dir, prefix="transformer." if model_type == "gpt2" else "")
    _check_hf_weights(source, cfg, model_type, expected)
    source_dir = tokenizer_dir if tokenizer_dir is not None else (hf_dir if _has_tokenizer(hf_dir) else None)
    tokenizer = load_tokenizer(source_dir, cfg.model.vocab_size) if source_dir is not None else None
    if tokenizer is not None and tokenizer.chat_template is None:
        _import_chat_template(tokenizer, Path(source_dir) / "tokenizer_config.json")

    def produce(name: str) -> torch.Tensor:
        _, hfs, kind = by_name[name]
        return hf.to_mtnlg(kind, [source.get(h).float() for h in hfs], cfg.model)

    by_name = {row[0]: row for row in rows}
    shapes = {name: (meta[name].shape, torch.float32) for name, _, _ in rows}

    def fill(tmp: Path) -> None:
        write_model_files(tmp, None, cfg, tokenizer)
        write_streaming(tmp / WEIGHTS_FILE, shapes, produce)
        if tokenizer is not None:
            for extra in HF_TOKENIZER_FILES:
                if (Path(source_dir) / extra).is_file():
                    shutil.copy(Path(source_dir) / extra, tmp / "tokenizer" / extra)
        write_checksums(tmp, local=True)

    return atomic_dir(out_dir, fill)


def _import_chat_template(tokenizer: Tokenizer, config_path: Path) -> None:
    """Give ``tokenizer`` the family's chat template from ``tokenizer_config.json`` when it maps onto role
    markers (ChatML); otherwise the default template applies, and the file travels along unchanged."""
    if not config_path.is_file():
        return
    jinja = read_json(config_path).get("chat_template")
    if isinstance(jinja, list):  # named templates: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if t.get("name") == "default"), None)
    template = ChatTemplate.from_hf(jinja) if isinstance(jinja, str) else None
    if template is not None:
        template.attach(tokenizer)


def to_hf(
    ckpt: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Export an mtnlg checkpoint as an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads
    (GPT-2 or the Llama family, by the model's switches), with its tokenizer (``tokenizer_dir``'s when given)."""
    check_output(out_dir, HF, [ckpt, tokenizer_dir], overwrite)
    directory = resolve_verified(ckpt)
    cfg = load_config(directory)
    model_type = hf.export_family(cfg.model)
    if (directory / WEIGHTS_FILE).is_file():
        source: TensorSource = TensorSource.of_files([directory / WEIGHTS_FILE])
        tokenizer = stored_tokenizer(directory)
    else:  # a training step without consolidated weights: gathered in memory
        model, cfg, tokenizer = load_model(directory)
        source = TensorSource.of_dict(model.state_dict(), str(directory))
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir, cfg.model.vocab_size)
    meta = _meta_state(cfg)
    rows = hf.plan(cfg.model, model_type, set(meta))
    out_shapes, makers = {}, {}
    for name, hfs, kind in rows:
        for i, (hf_name, t) in enumerate(zip(hfs, hf.to_hf(kind, meta[name], cfg.model), strict=True)):
            out_shapes[hf_name] = (t.shape, source.dtype(name))
            makers[hf_name] = (name, kind, i)

    def produce(hf_name: str) -> torch.Tensor:
        name, kind, i = makers[hf_name]
        return hf.to_hf(kind, source.get(name), cfg.model)[i]

    eos = tokenizer.eod_id if tokenizer is not None else cfg.model.vocab_size - 1

    def fill(tmp: Path) -> None:
        write_streaming(tmp / "model.safetensors", out_shapes, produce)
        write_json(tmp / "config.json", hf.hf_config(cfg.model, eos, model_type), indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
            if model_type == "gpt2":
                tokenizer.save_gpt2_files(tmp)
            for extra in HF_TOKENIZER_FILES:
                if (directory / "tokenizer" / extra).is_file() and tokenizer_dir is None:
                    shutil.copy(directory / "tokenizer" / extra, tmp / extra)

    return atomic_dir(out_dir, fill)


def upcycle(
    ckpt: str | Path, out_dir: str | Path, experts: int, overrides: list[str] | None = None, overwrite: bool = False
) -> Path:
    """Sparse upcycling (Komatsuzaki et al. 2023): a MoE checkpoint from a dense one, every expert of a MoE
    block a copy of that block's dense MLP, the router freshly initialised (from ``train.seed``).

    ``overrides`` set the other ``model.moe_*`` fields (``--model.moe_top_k=1``, ...). With gates that sum
    to 1 (top-k > 1, or sigmoid scores) and dropless routing, the first forward equals the dense model's.
    """
    check_output(out_dir, MODEL, [ckpt], overwrite)
    dense, cfg, tokenizer = load_model(ckpt)
    if cfg.model.moe_experts:
        raise ConfigError(f"{ckpt} is already a mixture-of-experts model (model.moe_experts={cfg.model.moe_experts})")
    bad = [o for o in overrides or [] if not o.startswith("--model.moe_")]
    if bad:
        raise ConfigError(f"upcycling takes only --model.moe_* settings, got {bad}")
    new = apply_settings(copy.deepcopy(cfg), overrides=[f"--model.moe_experts={experts}", *(overrides or [])])
    m = new.validate().model
    if m.expert_ffn_size != m.ffn_size or m.moe_shared_expert:
        raise ConfigError("upcycled experts are copies of the dense MLP: leave model.moe_ffn_hidden at 0 and "
                          "model.moe_shared_expert off")
    with torch.device("meta"):
        model = GPT(m)
    model.materialize("cpu", new.train.seed)
    state, dense_state = model.state_dict(), dense.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name in dense_state:
                tensor.copy_(dense_state[name])
        for i in range(m.n_layers):
            if m.is_moe_layer(i):
                mlp, grouped = dense.blocks[str(i)].mlp, model.blocks[str(i)].mlp.experts
                for part in ("fc_in", "fc_gate", "fc_out"):
                    layer = getattr(mlp, part)
                    if layer is None:
                        continue
                    getattr(grouped, f"{part}_weight").copy_(layer.weight.expand(experts, -1, -1))
                    if layer.bias is not None:
                        getattr(grouped, f"{part}_bias").copy_(layer.bias.expand(experts, -1))
    return save_model(out_dir, model, new, tokenizer)
