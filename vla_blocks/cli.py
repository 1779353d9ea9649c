"""The ``vla-blocks`` command line.

Subcommands: ``recipes`` (one name per line), ``info RECIPE [KEY=VALUE ...]`` (component tree with
parameter counts per expert and in total, computed on the meta device: no weights allocated),
``demo`` (every tiny recipe: a forward/backward step and an inference call), plus the subcommands
listed in :data:`SUBCOMMANDS` (``convert``, ``push``, ``bench``), implemented beside what they drive and
imported only when used.
Errors print one line saying what is wrong and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from typing import Callable

import torch

from .config import ConfigError, list_recipes, parse_override

# Subcommands implemented in other modules: name -> (help, "module:add_arguments", "module:run").
# The module is imported only when its subcommand is parsed (heavy and optional imports stay lazy);
# ``add_arguments(parser)`` declares the options, ``run(args) -> int`` is the exit status.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "convert": ("convert an upstream checkpoint (HALO/BAGEL, lerobot pi0/pi0.5) to a saved model",
                "vla_blocks.convert:add_cli_arguments", "vla_blocks.convert:run_cli"),
    "push": ("upload a saved model folder to the Hugging Face Hub",
             "vla_blocks.hub:add_push_arguments", "vla_blocks.hub:run_push"),
    "bench": ("run a benchmark suite (attention, inference, backbone, serve) and write results",
              "vla_blocks.bench:add_arguments", "vla_blocks.bench:cmd_bench"),
    "train": ("train a recipe (one process, DDP or FSDP2 under torchrun) with checkpoints and exact resume",
              "vla_blocks.train.api:add_arguments", "vla_blocks.train.api:run"),
    "stats": ("normalisation statistics of a LeRobotDataset (mean/std/min/max/quantiles) -> normalization.json",
              "vla_blocks.data.stats:add_arguments", "vla_blocks.data.stats:run"),
    "annotate": ("HALO EM-CoT annotation (primitives, VLM or rule subtasks, subgoals) -> DATASET/meta/emcot",
                 "vla_blocks.emcot.cli:add_arguments", "vla_blocks.emcot.cli:run"),
    "trace": ("view saved policy / episode traces as one self-contained offline HTML report",
              "vla_blocks.trace.view:add_arguments", "vla_blocks.trace.view:run"),
    "demos": ("scripted-expert demonstrations of a simulator suite (metaworld) -> a LeRobotDataset v3",
              "vla_blocks.envs.demos:add_arguments", "vla_blocks.envs.demos:run"),
    "eval": ("closed-loop evaluation of a model or reference policy in a simulator (metaworld) -> JSON + Markdown",
             "vla_blocks.envs.evaluate:add_arguments", "vla_blocks.envs.evaluate:run"),
    "serve": ("serve a policy over openpi's websocket protocol (openpi-client compatible)",
              "vla_blocks.serve.cli:add_arguments", "vla_blocks.serve.cli:run"),
}


def _resolve(target: str) -> Callable:
    import importlib
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def parameter_tree(model: torch.nn.Module) -> "OrderedDict[str, int]":
    """Parameter counts grouped by top-level component, and per expert inside MoT stacks."""
    groups: OrderedDict[str, int] = OrderedDict()
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        if "experts" in parts:
            i = parts.index("experts")
            key = ".".join(parts[:i - 2] if parts[i - 2] == "layers" else parts[:i]) + f" [expert {parts[i + 1]}]"
        elif "norms" in parts:
            i = parts.index("norms")
            key = ".".join(parts[:i]) + f" [expert {parts[i + 1]}]"
        groups[key] = groups.get(key, 0) + p.numel()
    return groups


def build_on_meta(ref: str, overrides: list[str]):
    from .model import model_config
    kv = dict(parse_override(o) for o in overrides)
    cfg = model_config(ref, **kv)
    with torch.device("meta"):
        model = cfg.build()
    return cfg, model


def cmd_recipes(args) -> int:
    for r in list_recipes():
        print(r)
    return 0


def cmd_info(args) -> int:
    cfg, model = build_on_meta(args.recipe, args.overrides)
    print(f"{args.recipe}: {type(model).__name__} (type: {cfg.type})")
    tree = parameter_tree(model)
    width = max(len(k) for k in tree) if tree else 10
    for k, n in tree.items():
        print(f"  {k:<{width}}  {_fmt(n):>9}  ({n:,})")
    total = sum(tree.values())
    print(f"  {'total':<{width}}  {_fmt(total):>9}  ({total:,})")
    return 0


def cmd_demo(args) -> int:
    from .model import create_model
    names = args.recipes or [r for r in list_recipes() if r.endswith("-tiny")]
    torch.manual_seed(args.seed)
    failures = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            model = create_model(name)
            g = torch.Generator().manual_seed(args.seed)
            batch = model.demo_batch(batch_size=2, generator=g)
            model.train()
            loss, metrics = model(batch)
            loss.backward()
            grads = sum(1 for p in model.parameters() if p.grad is not None)
            model.eval()
            with torch.no_grad():
                out = model.demo_inference(batch)
            dt = time.perf_counter() - t0
            shown = ", ".join(f"{k}={_show(v)}" for k, v in metrics.items())
            print(f"[ok] {name}: {_fmt(model.num_parameters())} params, loss {loss.item():.4f} ({shown}); "
                  f"{grads} tensors got gradients; {dt:.1f}s")
            for k, v in out.items():
                print(f"     {k}: {_show(v)}")
        except Exception as e:  # the demo reports every recipe, then fails at the end
            failures += 1
            print(f"[FAILED] {name}: {type(e).__name__}: {e}")
    print(f"demo: {len(names) - failures}/{len(names)} tiny recipes ran")
    return 1 if failures else 0


def _show(v) -> str:
    if isinstance(v, torch.Tensor):
        if v.numel() == 1:
            return f"{v.item():.4g}"
        return f"tensor{list(v.shape)} mean {v.float().mean().item():.4g}" if v.is_floating_point() else \
            f"{v.tolist()}" if v.numel() <= 16 else f"tensor{list(v.shape)}"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) < 300 else s[:300] + "…"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-blocks", description="vla_blocks: building blocks for VLA models.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("recipes", help="list the model recipes shipped with the package, one per line")
    s.set_defaults(fn=cmd_recipes)
    s = sub.add_parser("info", help="component tree with parameter counts (no weights allocated)")
    s.add_argument("recipe", help="recipe name, recipe path, hf-hub:org/name or local-dir:path")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. experts.act.hidden_size=512")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("demo", help="build every tiny recipe, run a training step and an inference call")
    s.add_argument("--recipes", nargs="*", help="recipes to run (default: every *-tiny recipe)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)
    for name, (help_, add, run) in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=help_)
        s.set_defaults(fn=_LazyRun(run))
    return p


class _LazyRun:
    """Imports a subcommand's module when the subcommand runs."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, args) -> int:
        return _resolve(self.target)(args)


def _parse(parser: argparse.ArgumentParser, argv):
    """Parse after adding the options of the subcommand named in ``argv`` (its module imported on demand)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in SUBCOMMANDS:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _resolve(SUBCOMMANDS[name][1])(sub.choices[name])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = _parse(parser, argv)
    try:
        return args.fn(args)
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vla-blocks {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
