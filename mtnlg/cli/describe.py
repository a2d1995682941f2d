"""``mtnlg config``, ``info`` and ``plan``: what a configuration is, costs and needs (nothing is trained)."""

from __future__ import annotations

import argparse
import json

from mtnlg.cli.args import command, config_args, no_overrides
from mtnlg.config import Config, ConfigError, build_config

# -- config ----------------------------------------------------------------------------------------


def _config_cmd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "reference"],
                   help="show: the effective config as TOML, each field with its help; "
                        "reference: every field's default as the Markdown tables of docs/configuration.md")
    config_args(p)
    p.add_argument("--update", metavar="FILE", help="reference: rewrite the reference between the markers of FILE")


@command("config", _config_cmd_args)
def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the configuration a command would use (--preset, --config, overrides) as TOML, or the reference.

    `mtnlg config show ... > run.toml` writes a file that --config reads back.
    """
    from mtnlg.config.text import reference_markdown, to_toml, update_reference

    if args.action == "show":
        print(to_toml(build_config(args.preset, args.config, overrides)), end="")
        return 0
    no_overrides(overrides)
    if args.preset or args.config:
        raise ConfigError("config reference lists the defaults: it takes no --preset or --config")
    if args.update:
        print(f"{args.update}: {'updated' if update_reference(args.update) else 'already up to date'}")
        return 0
    print(reference_markdown(), end="")
    return 0


# -- info ------------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--list", action="store_true", help="list the presets and exit")


@command("info", _info_args)
def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    """Parameters, FLOPs per token and memory of a model shape (nothing is allocated)."""
    from mtnlg.config.presets import PRESETS
    from mtnlg.model.counts import model_info
    from mtnlg.util.fmt import human

    if args.list:
        for name, m in PRESETS.items():
            kv = f" KV={m.kv_heads}" if m.kv_heads != m.n_heads else ""
            print(f"{name:15s} {human(model_info(m).parameters):>8s}  L={m.n_layers} C={m.hidden} H={m.n_heads}{kv}"
                  f"{'' if m.position == 'learned' else f'  {m.position}/{m.norm}/{m.mlp}'}")
        return 0
    cfg = build_config(args.preset or "gpt2-small", args.config, overrides)
    info = model_info(cfg.model)
    if args.json:
        print(json.dumps({"model": cfg.to_dict()["model"], **info.to_dict()}, indent=2))
        return 0
    m = cfg.model
    family = "" if m.position == "learned" else f" kv_heads={m.kv_heads} ({m.position}, {m.norm}, {m.mlp})"
    print(f"model            L={m.n_layers} hidden={m.hidden} heads={m.n_heads} ffn={m.ffn_size} seq={m.seq_len}"
          f"{family}")
    print(f"vocabulary       {m.vocab_size} (padded to {info.padded_vocab_size})")
    print(f"parameters       {human(info.parameters)} ({info.parameters:,}); "
          f"non-embedding {human(info.non_embedding_parameters)}")
    if m.moe_experts:
        print(f"experts          {m.moe_experts} x ffn {m.expert_ffn_size}, top-{m.moe_top_k}, in {m.moe_layers} of "
              f"{m.n_layers} blocks; active parameters {human(info.active_parameters)} per token")
    print(f"FLOPs/token      forward {human(info.forward_flops_per_token)}, "
          f"training {human(info.train_flops_per_token)} (at seq {m.seq_len})")
    print(f"memory           weights {info.weights_gib_bf16:.1f} GiB in bf16; "
          f"training state (fp32 weights, gradients, AdamW) {info.train_state_gib:.1f} GiB")
    if cfg.parallel.pp > 1:
        print(_pipeline_summary(cfg))
    return 0


def _pipeline_summary(cfg: Config) -> str:
    """Stage split and bubble of the configured pipeline, e.g. for --parallel.pp=35."""
    from mtnlg.config.schedules import bubble_fraction, layer_split
    from mtnlg.parallel.pipeline import microbatches

    pc = cfg.parallel
    split = layer_split(cfg.model.n_layers, pc.pp * pc.pp_stages_per_rank)
    sizes = sorted({len(r) for r in split})
    m = microbatches(cfg, max(pc.dp, 1), cfg.train.global_batch_size)
    bubble = bubble_fraction(pc.pp_schedule, pc.pp, m, pc.pp_stages_per_rank)
    return (f"pipeline         {len(split)} stages ({pc.pp} ranks x {pc.pp_stages_per_rank}) of "
            f"{'-'.join(map(str, sizes))} layers; {pc.pp_schedule} with {m} micro-batches: bubble {bubble:.1%}")


# -- plan ------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
    from mtnlg.planner.report import add_arguments

    config_args(p)
    add_arguments(p)


@command("plan", _plan_args)
def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """Predict memory per GPU, step time, MFU and days to train of a layout on a cluster (or --search them).

    The model comes from --preset/--config/overrides; the cluster from --gpu (published specs) or the
    explicit figures; the layout from --tp/--pp/--dp/... Nothing is allocated.
    """
    from mtnlg.planner.report import run

    preset = args.preset or "gpt2-small"
    model_flags = [f"--preset {preset}", *([f"--config {args.config}"] if args.config else []), *overrides]
    print(run(args, build_config(preset, args.config, overrides).model, model_flags))
    return 0
