"""The ``surgery`` command: validate, schema, plan, diff, apply, verify, generate, eval, export.

Every user-fixable problem is printed as one ``error:`` message without a
traceback and exits with code 2 before anything is written; ``-v`` shows
tracebacks. Overrides are ``key.path=value`` words after the recipe. ``-q`` and
``-v`` go before or after the command. The schema-only commands (:data:`SCHEMA_ONLY`)
import neither torch nor transformers, so they answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .errors import SurgeryError
from .options import (
    ApplyOptions,
    ApproximateOptions,
    DiffOptions,
    EvalOptions,
    ExportOptions,
    GenerateOptions,
    PlanOptions,
    add_options,
    options_from_args,
)

EXAMPLES: dict[str, str] = {
    "validate": """
        surgery validate recipes/*.yaml
        surgery validate recipes/smollm2_mamba.yaml stages.stage3.lr=5e-5
    """,
    "schema": """
        surgery schema > recipe.schema.json     # for editor completion / validation
    """,
    "plan": """
        surgery plan recipes/smollm2_mamba.yaml
        surgery plan recipes/tiny.yaml teacher.model=random:gpt2 --format json
    """,
    "diff": """
        surgery diff recipes/tiny.yaml
        surgery diff recipes/smollm2_mamba.yaml --format html -o diff.html
    """,
    "apply": """
        surgery apply recipes/smollm2_mamba.yaml
        surgery apply recipes/tiny.yaml teacher.model=random:phi --out runs/tiny-phi
        surgery apply recipes/smollm2_mamba.yaml --resume        # after an interruption
        surgery apply recipes/tiny.yaml stages.stage1.enabled=false   # stage ablation
        torchrun --nproc-per-node 8 -m surgery apply recipes/phi_mamba_8gpu.yaml   # 8 GPUs
        surgery apply recipes/tiny.yaml --nproc 2 --out runs/tiny-2   # the same, torchrun started for you
    """,
    "verify": """
        surgery verify runs/smollm2-mamba --tokens 4096
    """,
    "generate": """
        surgery generate runs/smollm2-mamba "def fibonacci(n):" --max-new-tokens 64
        surgery generate runs/smollm2-mamba "import os" "class Stack:" --max-new-tokens 32   # one batch
    """,
    "eval": """
        surgery eval builtin:smollm2-135m --data builtin:python-docs --tokens 4096
        surgery eval runs/smollm2-mamba --data builtin:python-docs --tokens 4096
    """,
    "approximate": """
        surgery approximate                                   # SmolLM2-135M, 1 sequence, 1 head a layer: minutes on a CPU
        surgery approximate --ranks 32 --families low_rank,ssd --layers 0,15,29
        surgery approximate --samples 16 --heads-per-layer all --steps 500 --device cuda --out runs/approx-gpu
        surgery approximate --teacher random:llama --seq-len 64 --steps 20   # seconds, a smoke test
    """,
    "export": """
        surgery export runs/smollm2-hybrid --to bamba -o runs/smollm2-hybrid-bamba
        vllm serve runs/smollm2-hybrid-bamba        # or AutoModelForCausalLM.from_pretrained, no surgery needed
    """,
}

DESCRIPTIONS: dict[str, str] = {
    "validate": "Check recipes against the schema (no model is loaded). Exits 2 on the first invalid recipe.",
    "schema": "Print the JSON Schema of the recipe format.",
    "plan": "Show which attention nodes each replace rule selects and the parameter counts, without training.",
    "diff": "Show teacher vs student graphs: nodes replaced, edges changed, parameters, weight transfers.",
    "apply": "Run the whole job: load the teacher, rewrite it, distil with the enabled MOHAWK stages, write the student.",
    "verify": "Measure a student's alignment with its teacher: stage-1/2 distances, KL, perplexities, top-1 agreement.",
    "generate": "Generate text with a student (or any model reference), streaming tokens as they come.",
    "eval": "Held-out perplexity of a teacher reference or a student directory (same code path for both).",
    "approximate": "MOHAWK's Table 3 on a teacher: fit each structured mixer family (Toeplitz, low-rank, SSD, "
                   "semiseparable) to its attention matrices on held-out text, at each rank/state size; print the "
                   "mean Frobenius distance per family and per layer, and write approximate.{json,md,png}. "
                   "Lower is closer; the families nest (low-rank within SSD within semiseparable), so each is "
                   "warm-started at the smaller family's optimum.",
    "export": "Write a student as a native transformers checkpoint (e.g. BambaForCausalLM) that loads without surgery; "
              "refuses, naming the mismatch, whatever the target cannot express exactly.",
}


SCHEMA_ONLY = frozenset({"validate", "schema"})  # commands that never load a model
LIBRARIES_LATER = SCHEMA_ONLY | {"plan", "diff", "apply"}  # these check their recipe before importing transformers
_KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[\w-]+)+$")  # stages.stage1.lr


def _split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate recipe paths from ``key.path=value`` overrides."""
    paths = [w for w in words if "=" not in w]
    overrides = [w for w in words if "=" in w]
    return paths, overrides


def _missing_equals(word: str) -> SurgeryError | None:
    """An error for a word that is no file but reads like an override without its ``=value``."""
    from pathlib import Path

    if Path(word).exists() or not _KEY_PATH.match(word) or word.endswith((".yaml", ".yml")):
        return None
    return SurgeryError(f"{word!r} is neither a recipe file nor an override: an override needs '=', "
                        f"e.g. {word}=VALUE")


def _load_recipe(args: argparse.Namespace) -> Any:
    from .recipe import Recipe

    paths, overrides = _split_overrides(args.overrides)
    if paths:
        raise _missing_equals(paths[0]) or SurgeryError(
            f"expected key.path=value overrides after the recipe, got {paths[0]!r}")
    return Recipe.load(args.recipe, overrides)


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from .io import atomic_write_text

    atomic_write_text(output, text)
    print(f"wrote {output}", file=sys.stderr)


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    paths, overrides = _split_overrides(args.recipe)
    if not paths:
        raise SurgeryError("no recipe given; e.g. surgery validate recipes/*.yaml")
    for word in paths:
        error = _missing_equals(word)
        if error:
            raise error
    for path in paths:
        recipe = Recipe.load(path, overrides)
        stages = [str(i) for i in (1, 2, 3) if recipe.stage(i).enabled] or ["none"]
        rules = ", ".join(r.mixer for r in recipe.replace) or "identity"
        print(f"ok  {path}  teacher={recipe.teacher.model}  rules=[{rules}]  stages={','.join(stages)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    print(json.dumps(Recipe.json_schema(), indent=None if args.compact else 2))
    return 0


def _teacher_and_rules(recipe: Any) -> tuple[Any, list[Any], Any]:
    """The teacher for plan / diff (its skeleton, unless ``layers: auto`` needs its weights) and the rules to apply."""
    from .layer_choice import has_auto, ranking_batches, resolve_auto_layers
    from .teacher import load_teacher, load_teacher_skeleton

    if not has_auto(recipe.replace):
        return load_teacher_skeleton(recipe.teacher)[0], recipe.replace, None
    teacher = load_teacher(recipe.teacher, device="cpu")  # layers: auto is chosen from the teacher's activations
    rules, choice = resolve_auto_layers(recipe.replace, teacher.model, ranking_batches(recipe, teacher.tokenizer))
    return teacher.model, rules, choice


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args)  # a bad recipe is refused before torch is imported
    opts = options_from_args(PlanOptions, args)
    from .log import quiet_libraries
    from .rewriter import plan, splice
    from .student.prebuild import check_rebuildable

    quiet_libraries(args.verbose)
    model, rules, choice = _teacher_and_rules(recipe)
    result = plan(model, rules)
    student = splice(copy.deepcopy(model), result.nodes())  # the student's module tree (on meta for a skeleton)
    check_rebuildable(student, result, recipe.output.dir)  # what apply would otherwise find after training
    if opts.format == "json":
        _write(json.dumps(result.to_dict() | ({"layer_choice": choice.to_dict()} if choice else {}), indent=2), None)
    else:
        _write(result.to_text() + (f"\n{choice.to_text()}" if choice else ""), None)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args)  # a bad recipe is refused before torch is imported
    opts = options_from_args(DiffOptions, args)
    from .graph_diff import diff
    from .log import quiet_libraries
    from .rewriter import rewrite

    quiet_libraries(args.verbose)
    model, rules, _ = _teacher_and_rules(recipe)
    student, result = rewrite(model, rules)
    d = diff(model, student, result)
    text = {"text": d.to_text, "json": lambda: json.dumps(d.to_dict(), indent=2), "html": d.to_html}[opts.format]()
    _write(text, opts.output)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .log import launch_rank
    from .output_dir import check_output_dir

    recipe = _load_recipe(args)
    opts = options_from_args(ApplyOptions, args)
    check_output_dir(opts.out if opts.out is not None else recipe.output.dir)  # before torch is imported
    if args.nproc is not None:  # distributed: start torchrun on this machine
        from .launch import launch

        return launch(args.argv, args.nproc, recipe, opts)
    from .log import quiet_libraries
    from .pipeline import apply

    quiet_libraries(args.verbose)
    try:
        out = apply(recipe, opts)
    except KeyboardInterrupt:
        work = Path(opts.out if opts.out is not None else recipe.output.dir)
        work = work.with_name(work.name + ".partial")
        resumable = (work / "checkpoint" / "state.json").is_file()
        print("\ninterrupted; " + ("the same command with --resume continues from the last checkpoint"
                                   if resumable else "nothing was checkpointed yet: run the same command again"),
              file=sys.stderr)
        return 130
    if launch_rank() == 0:
        print(f"student written to {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from verify.standalone import verify_student

    opts = options_from_args(EvalOptions, args)
    report = verify_student(args.student, opts)
    print(report)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text, generate_texts

    opts = options_from_args(GenerateOptions, args)
    if len(args.prompt) == 1:
        generate_text(args.model, args.prompt[0], opts)
    else:
        generate_texts(args.model, args.prompt, opts)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_reference

    opts = options_from_args(EvalOptions, args)
    result = evaluate_reference(args.model, opts)
    print(json.dumps(result, indent=2))
    return 0


def cmd_approximate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .approximate.study import markdown, run_study, write

    opts = options_from_args(ApproximateOptions, args)
    try:
        result = run_study(opts, progress=not getattr(args, "quiet", False))
    except ValueError as err:  # a bad --ranks / --families / --heads-per-layer, said in flag terms
        raise SurgeryError(str(err)) from None
    paths = write(result, Path(opts.out))
    print(markdown(result))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .native import export

    opts = options_from_args(ExportOptions, args)
    out = export(args.student, opts.output, to=opts.to, overwrite=opts.overwrite)
    print(f"native {opts.to} checkpoint written to {out}")
    return 0


# --------------------------------------------------------------------------- parser


def _subparser(sub: Any, name: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=DESCRIPTIONS[name],
        description=DESCRIPTIONS[name],
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(EXAMPLES[name]).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    _add_verbosity(parser, default=argparse.SUPPRESS)  # also after the command: surgery apply R -q
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="No progress bars or info messages.")
    parser.add_argument("-v", "--verbose", action="count", default=default, help="More output; tracebacks on errors.")


OVERRIDES_HELP = "override a recipe field, e.g. stages.stage1.lr=1e-3 (values are YAML: 3, true, [0, 2], null)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="surgery",
        description=(
            "Turn a pretrained Transformer into a state-space model by declarative model surgery.\n"
            "A YAML recipe says which attention nodes to replace with which SSM mixer; surgery\n"
            "rewrites the teacher, distils with the three MOHAWK stages and writes a student that\n"
            "loads and generates like any Hugging Face causal LM."
        ),
        epilog=(
            "start here:\n"
            "  surgery validate recipes/*.yaml\n"
            "  surgery plan recipes/smollm2_mamba.yaml\n"
            "  surgery apply recipes/smollm2_mamba.yaml\n"
            "run 'surgery COMMAND --help' for a command's options and examples."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"surgery {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help="No progress bars or info messages.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="More output; tracebacks on errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _subparser(sub, "validate", cmd_validate)
    p.add_argument("recipe", nargs="+", metavar="RECIPE|KEY=VALUE", help="recipe files and overrides")

    p = _subparser(sub, "schema", cmd_schema)
    p.add_argument("--compact", action="store_true", help="One line of JSON.")

    for name, handler, opts in (
        ("plan", cmd_plan, PlanOptions),
        ("diff", cmd_diff, DiffOptions),
        ("apply", cmd_apply, ApplyOptions),
    ):
        p = _subparser(sub, name, handler)
        p.add_argument("recipe", metavar="RECIPE", help="recipe file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
        add_options(p, opts, short={"output": "-o"})
        if name == "apply":  # a launcher flag, not an option of the run itself
            p.add_argument("--nproc", type=int, metavar="N", default=None,
                           help="Run on N local processes: starts torchrun (GPUs with NCCL, else CPU with gloo).")

    p = _subparser(sub, "verify", cmd_verify)
    p.add_argument("student", metavar="STUDENT_DIR", help="a directory written by surgery apply")
    add_options(p, EvalOptions)

    p = _subparser(sub, "generate", cmd_generate)
    p.add_argument("model", metavar="STUDENT_DIR|REF", help="a student directory or a teacher reference")
    p.add_argument("prompt", nargs="+", help="the text to continue; several prompts run as one left-padded batch")
    add_options(p, GenerateOptions)

    p = _subparser(sub, "eval", cmd_eval)
    p.add_argument("model", metavar="MODEL_DIR|REF", help="a student directory or a teacher reference")
    add_options(p, EvalOptions)

    p = _subparser(sub, "approximate", cmd_approximate)
    add_options(p, ApproximateOptions, short={"out": "-o"})

    p = _subparser(sub, "export", cmd_export)
    p.add_argument("student", metavar="STUDENT_DIR", help="a directory written by surgery apply or surgery.save")
    add_options(p, ExportOptions, short={"output": "-o"})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .log import configure, rank_prefix

    configure(quiet=args.quiet, verbose=args.verbose, libraries=args.command not in LIBRARIES_LATER)
    try:
        return args.handler(args)
    except SurgeryError as err:
        if args.verbose:
            raise
        print(f"error: {rank_prefix()}{err}", file=sys.stderr)
        return err.exit_code
    except FileNotFoundError as err:
        if args.verbose:
            raise
        print(f"error: {rank_prefix()}{err.strerror}: {err.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # surgery apply says whether --resume can continue (cmd_apply)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()


__all__ = ["build_parser", "main"]
