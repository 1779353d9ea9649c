"""The ``vla-blocks`` command line.

Subcommands: ``recipes`` (one name per line), ``info RECIPE [KEY=VALUE ...]`` (component tree with
parameter counts per expert and in total, computed on the meta device: no weights allocated;
``--show-config`` prints the resolved recipe as YAML instead, ``--fields`` every resolved field with its value
and help),
``demo`` (every tiny recipe: a forward/backward step and an inference call), plus the subcommands
listed in :data:`SUBCOMMANDS` (``convert``, ``push``, ``bench``), implemented beside what they drive and
imported only when used.
Errors print one line saying what is wrong and exit with status 2 (``--debug``: the traceback instead).
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
              "vla_blocks.data.cli:add_arguments", "vla_blocks.data.cli:run"),
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
    """The resolved config of ``ref`` with ``KEY=VALUE`` overrides and its model built on the meta device (shapes only,
    no memory)."""
    from .model import model_config
    kv = dict(parse_override(o) for o in overrides)
    cfg = model_config(ref, **kv)
    with torch.device("meta"):
        model = cfg.build()
    return cfg, model


def cmd_recipes(args) -> int:
    """``vla-blocks recipes``: print the shipped recipe names, one per line."""
    for r in list_recipes():
        print(r)
    return 0


def _value_at(cfg, path: str):
    """The value at a dotted field path below ``cfg`` (attributes of configs, keys of mappings, list indices)."""
    val = cfg
    for part in path.split("."):
        if isinstance(val, dict):
            val = val[part]
        elif isinstance(val, (list, tuple)):
            val = val[int(part)]
        else:
            val = getattr(val, part)
    return val


def field_rows(cfg, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key path, value, help)`` of every field of a resolved config, as :func:`~vla_blocks.config.describe_fields`
    gives them, plus the configs held in mappings or lists (``experts.und.hidden_size``) expanded below their field.
    The help of a field is found next to it in its dataclass (:func:`~vla_blocks.config.field_docs`)."""
    from dataclasses import is_dataclass

    from .config import describe_fields
    rows = []
    for key, shown, help_ in describe_fields(cfg, prefix):
        val = _value_at(cfg, key[len(prefix):])
        items = list(val.items()) if isinstance(val, dict) else \
            list(enumerate(val)) if isinstance(val, (list, tuple)) else []
        nested = [(str(k), v) for k, v in items if is_dataclass(v)]
        if not nested:
            rows.append((key, shown, help_))
            continue
        rows.append((key, f"<{len(items)} entries>", help_))
        for k, v in nested:
            rows.append((f"{key}.{k}", f"<{getattr(v, 'type', '') or type(v).__name__}>", ""))
            rows += field_rows(v, f"{key}.{k}.")
    return rows


def print_fields(cfg, title: str, width: int | None = None) -> None:
    """Print :func:`field_rows` of ``cfg``: ``key = value`` indented by depth, the help beside it (wrapped)."""
    import shutil
    import textwrap
    width = width or max(100, shutil.get_terminal_size((120, 24)).columns)
    rows = [("  " * (1 + key.count(".")) + f"{key} = {shown}", help_) for key, shown, help_ in field_rows(cfg)]
    col = min(max((len(left) for left, _ in rows), default=0), 44) + 2
    print(title)
    for left, help_ in rows:
        if not help_:
            print(left)
            continue
        lines = textwrap.wrap(help_, max(40, width - col - 2))
        if len(left) + 2 > col:
            print(left)
            left = ""
        print(f"{left:<{col}}# {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{col}}  {line}")


def cmd_info(args) -> int:
    """``vla-blocks info``: the parameter tree of a recipe (meta device), or its resolved YAML (``--show-config``),
    batch schema (``--batch``) or fields with their help (``--fields``)."""
    if getattr(args, "fields", False):
        from .model import model_config
        cfg = model_config(args.recipe, **dict(parse_override(o) for o in args.overrides))
        print_fields(cfg, f"# {args.recipe}" + (f" {' '.join(args.overrides)}" if args.overrides else "")
                     + f": every field of the resolved config (type: {cfg.type}); its key path is the "
                       f"KEY of a KEY=VALUE override")
        return 0
    cfg, model = build_on_meta(args.recipe, args.overrides)
    if getattr(args, "show_config", False):
        from .config import dump_recipe
        print(f"# {args.recipe}" + (f" {' '.join(args.overrides)}" if args.overrides else "")
              + ": the resolved recipe (base, overrides and defaults applied)")
        print(dump_recipe(cfg), end="")
        return 0
    print(f"{args.recipe}: {type(model).__name__} (type: {cfg.type})")
    if getattr(args, "batch", False):
        schema = getattr(type(model), "batch_schema", None)
        if schema is None:
            print("  no batch schema: this model is not a policy")
            return 0
        print(f"  batch schema ({schema.name}; checked at forward / sample_actions / infer / predict_action_chunk / "
              f"select_action):")
        for line in schema.describe(model.batch_dims()):
            print(f"    {line}")
        return 0
    tree = parameter_tree(model)
    width = max(len(k) for k in tree) if tree else 10
    for k, n in tree.items():
        print(f"  {k:<{width}}  {_fmt(n):>9}  ({n:,})")
    total = sum(tree.values())
    print(f"  {'total':<{width}}  {_fmt(total):>9}  ({total:,})")
    return 0


def cmd_demo(args) -> int:
    """``vla-blocks demo``: build each tiny recipe, run one training step and one inference call, report each; exit 1 if
    any failed."""
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
    train_steps = args.train_steps if args.train_steps is not None else (0 if args.recipes else 200)
    if train_steps:
        from .train.api import demo_training
        t0 = time.perf_counter()
        r = demo_training(train_steps, args.seed)
        print(f"[train] pi0-tiny-demo on {r['source']}: {r['steps']} steps in {time.perf_counter() - t0:.1f}s, "
              f"loss {r['loss_start']:.4f} -> {r['loss_end']:.4f} (run folder {r['run_dir']})")
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
    """The ``vla-blocks`` argument parser (built-in subcommands; the :data:`SUBCOMMANDS` add their options when parsed).
    """
    p = argparse.ArgumentParser(prog="vla-blocks", description="vla_blocks: building blocks for VLA models.")
    p.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("recipes", help="list the model recipes shipped with the package, one per line")
    s.set_defaults(fn=cmd_recipes)
    s = sub.add_parser("info", help="component tree with parameter counts (no weights allocated)")
    s.add_argument("recipe", help="recipe name, recipe path, hf-hub:org/name or local-dir:path")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. experts.act.hidden_size=512")
    s.add_argument("--show-config", action="store_true",
                   help="print the resolved recipe (YAML: base, overrides and defaults applied) instead of the tree")
    s.add_argument("--batch", action="store_true", help="print the model's batch schema (keys, dtypes, shapes, ranges)")
    s.add_argument("--fields", action="store_true",
                   help="print every field of the resolved config with its value and help, nested components indented")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("demo", help="build every tiny recipe, run a training step and an inference call")
    s.add_argument("--recipes", nargs="*", help="recipes to run (default: every *-tiny recipe)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-steps", type=int, default=None,
                   help="steps of the short pi0-tiny training run (default 200; 0, or --recipes without this: none)")
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
    if "--debug" in argv[1:]:  # accepted after the subcommand too
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in SUBCOMMANDS:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _resolve(SUBCOMMANDS[name][1])(sub.choices[name])
    return parser.parse_args(argv)


def error_line(e: BaseException) -> str:
    """One line for an exception: project errors (ValueError family, missing files) by their message, anything
    else prefixed with its type; a multi-line message keeps its first line and says how many more there are."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = str(msg).strip() or type(e).__name__
    if not isinstance(e, (ConfigError, ValueError, KeyError, FileNotFoundError, FileExistsError)):
        text = f"{type(e).__name__}: {text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        return f"{lines[0].rstrip(':')} (+{len(lines) - 1} more lines: rerun with --debug)"
    return lines[0] if lines else text


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Every error is one line on stderr and exit status 2 (1 for an interrupted run);
    ``--debug`` prints the traceback instead."""
    parser = make_parser()
    args = _parse(parser, argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"vla-blocks {args.command}: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, never a traceback unless asked
        if args.debug:
            raise
        print(f"vla-blocks {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
