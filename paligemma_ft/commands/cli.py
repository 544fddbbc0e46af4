"""The `paligemma-ft` command: a thin layer that parses flags and calls the library.

    paligemma-ft download HANDLE [--file NAME]          fetch a Kaggle checkpoint (or reuse the cache); print its path
    paligemma-ft inspect --config PATH [--config.x=y]   show what the model will see for the config's data
    paligemma-ft train --config PATH --workdir DIR [--config.x=y] [--allow-config-change]
    paligemma-ft predict --image a.jpg [--image ...] --prompt "caption en" [--checkpoint SPEC --tokenizer SPEC]
    paligemma-ft evaluate --config PATH (--workdir DIR | --checkpoint SPEC) [--only NAME] [--outdir DIR]
    paligemma-ft app [--checkpoint SPEC --tokenizer SPEC --port N]   a local web page to try a checkpoint
    paligemma-ft plan --config PATH [--device H100 | --memory-gib N] [--devices N] [--arithmetic-only] [--policies]
                                                        will the config fit? memory per device, what to change
    paligemma-ft convert SRC DST [--step N] [--dtype D] [--tokenizer SPEC]   .npz / workdir <-> Hugging Face folder

Everything here is callable from Python (`main([...])` returns the exit code), and each command imports its
module only when it runs, so `paligemma-ft download` does not pay for importing JAX models.

Every failure the user caused (a bad flag, config value, file, checkpoint, sampler, output folder, missing
credentials: `paligemma_ft.errors.is_user_error`) is reported as one `error: ...` line on stderr (details, if any,
on indented lines below it), with secrets masked and control characters made visible, and exit code 2.
`PALIGEMMA_FT_DEBUG=1` raises it instead, with its traceback. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from paligemma_ft.errors import DEBUG_ENV, UserError, check_output_dir, describe_os_error, is_user_error
from paligemma_ft.safety import printable, redact_text

_MAX_DETAIL_LINES = 40  # Indented lines under the `error:` line (a mismatch can list every parameter).


class UsageError(UserError):
    """A bad command line: reported as one `error: ...` line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse without its usage dump and `sys.exit` on errors, so `main` can report one line and return 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=required,
        metavar="PATH",
        help="config file configs/NAME.py, optionally NAME.py:ARG for get_config(ARG); "
        "override fields with --config.a.b=VALUE (a Python literal, else a string)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands (unknown `--config.*` items are collected by `main`)."""
    parser = _Parser(prog="paligemma-ft", description="Fine-tune PaliGemma 1/2 in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("download", help="download a Kaggle checkpoint (or reuse the cache) and print its path")
    p.add_argument("handle", metavar="HANDLE", help="e.g. google/paligemma-2/jax/paligemma2-3b-pt-224[/VERSION]")
    p.add_argument("--file", default=None, metavar="NAME", help="one file of the model (default: the table's)")

    p = sub.add_parser("inspect", help="print the first training batch as a token table, with its checks")
    _add_config_args(p)
    p.add_argument("--batches", type=int, default=1, help="how many batches to show (default 1)")

    p = sub.add_parser("train", help="fine-tune with the config; checkpoints and logs go to --workdir")
    _add_config_args(p)
    p.add_argument("--workdir", required=True, metavar="DIR", help="output folder (checkpoints, logs, config)")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a workdir whose saved config.json differs (in keys that keep the state's shapes); the report "
        "records both configs (same as --config.allow_config_change=True)",
    )

    p = sub.add_parser("predict", help="run a checkpoint on image files with one prompt; one line per image")
    importlib.import_module("paligemma_ft.commands.predict").add_arguments(p)  # Light: JAX loads when it runs.

    p = sub.add_parser("evaluate", help="run the config's evaluators on a checkpoint; print a metrics table")
    _add_config_args(p)
    p.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="a run's folder: evaluates DIR/params.npz and writes the results there",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="SPEC",
        help="parameters to evaluate instead (builtin:demo, .npz, workdir, HF folder, hf:REPO, kaggle:HANDLE); "
        "default DIR/params.npz, else config.model_init",
    )
    p.add_argument(
        "--adapters",
        default=None,
        metavar="ADAPTERS.npz",
        help="a LoRA run's adapters.npz, merged into the checkpoint (default config.model_init: its base)",
    )
    p.add_argument(
        "--outdir",
        default=None,
        metavar="DIR",
        help="where eval_metrics.json, predictions and galleries go (default --workdir)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this evaluator of config.evals (repeatable)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="cast the weights to this dtype and compute in it (default: weights as stored, compute "
        "config.compute_dtype: bfloat16 on GPU/TPU, float32 on CPU)",
    )

    p = sub.add_parser("app", help="a local web page (Streamlit) to try a checkpoint on images")
    p.add_argument(
        "--checkpoint",
        default="builtin:demo",
        metavar="SPEC",
        help="builtin:demo (default), a big_vision .npz, a run's workdir, an HF folder, hf:REPO or kaggle:HANDLE",
    )
    importlib.import_module("paligemma_ft.commands.predict").add_adapters_and_tokenizer(p)
    p.add_argument("--port", type=int, default=None, help="local port (default Streamlit's, 8501)")

    p = sub.add_parser("plan", help="compile the train step without running it; memory per device, fits or not")
    _add_config_args(p)
    p.add_argument("--workdir", default=None, metavar="DIR", help="also write DIR/plan.json")
    p.add_argument(
        "--device",
        default=None,
        metavar="KIND",
        help="plan for this accelerator's memory (H100, H200, A100, 'TPU v4', 'TPU v5e'; default local)",
    )
    p.add_argument("--memory-gib", type=float, default=None, metavar="N", help="plan for N GiB per device")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="plan the mesh over N simulated CPU devices (e.g. 8 for an 8-GPU host)",
    )
    p.add_argument(
        "--arithmetic-only",
        action="store_true",
        help="skip compiling; estimate activations by arithmetic (faster, rougher)",
    )
    p.add_argument(
        "--policies",
        nargs="*",
        default=None,
        metavar="POLICY",
        help="also size these remat policies (none, dots, dots_with_no_batch_dims_saveable, full; no names: all "
        "four): peak and largest batch per policy, and the lightest that fits",
    )

    p = sub.add_parser("convert", help="convert a checkpoint: .npz / workdir <-> Hugging Face folder, streamed")
    importlib.import_module("paligemma_ft.commands.convert").add_arguments(p)
    return parser


def split_overrides(unknown: Sequence[str]) -> list[str]:
    """Keeps `--config.a.b=v` (or `--config.a.b v`) items as `--config.a.b=v`; anything else is a UsageError."""
    overrides, rest = [], list(unknown)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config."):
            raise UsageError(f"unrecognized argument {item!r} (config overrides look like --config.a.b=VALUE)")
        if "=" not in item:
            if not rest or rest[0].startswith("--"):
                raise UsageError(f"override {item!r} has no value: write {item}=VALUE")
            item = f"{item}={rest.pop(0)}"
        overrides.append(item)
    return overrides


def _load(args: argparse.Namespace, overrides: list[str]) -> Any:
    from paligemma_ft.config import load_config  # noqa: PLC0415 - lazy: keeps `--help` instant.

    return load_config(args.config, overrides) if args.config else None


def _run_command(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command == "download":
        if overrides:
            raise UsageError("download takes no --config overrides")
        from paligemma_ft.checkpoints import kaggle  # noqa: PLC0415

        return int(kaggle.download_command(args.handle, args.file))
    if args.command == "inspect":
        config = _load(args, overrides)
        from paligemma_ft.data import inspect_main  # noqa: PLC0415

        return int(inspect_main(config, n_batches=args.batches))
    if args.command == "train":
        if args.allow_config_change:
            overrides = [*overrides, "--config.allow_config_change=True"]
        config = _load(args, overrides)
        check_output_dir(args.workdir, "--workdir")  # A file, a read-only folder: refused before any work.
        from paligemma_ft.training import loop  # noqa: PLC0415 - lazy: keeps `--help` instant.

        result = loop.run(config, args.workdir)
        return result if isinstance(result, int) else 0
    if args.command == "predict":
        if overrides:
            raise UsageError("predict takes no --config overrides")
        from paligemma_ft.commands import predict  # noqa: PLC0415

        return int(predict.main(args))
    if args.command == "evaluate":
        config = _load(args, overrides)
        from paligemma_ft.evaluate.runner import evaluate_command  # noqa: PLC0415

        evaluate_command(
            config,
            args.workdir,
            args.checkpoint,
            outdir=args.outdir,
            only=args.only,
            dtype=args.dtype,
            adapters=args.adapters,
        )
        return 0
    if args.command == "app":
        if overrides:
            raise UsageError("app takes no --config overrides")
        from paligemma_ft.commands import app  # noqa: PLC0415 - Streamlit loads only in the page's own process.

        return int(app.launch(args.checkpoint, args.tokenizer, port=args.port, adapters=args.adapters))
    if args.command == "convert":
        if overrides:
            raise UsageError("convert takes no --config overrides")
        from paligemma_ft.commands import convert  # noqa: PLC0415

        return int(convert.main(args))
    if args.command == "plan":
        config = _load(args, overrides)
        if args.workdir:
            check_output_dir(args.workdir, "--workdir")
        from paligemma_ft.commands import plan  # noqa: PLC0415
        from paligemma_ft.model import remat  # noqa: PLC0415

        if args.devices:
            plan.simulate_cpu_devices(args.devices)
        return int(
            plan.run(
                config,
                args.workdir,
                memory_gib=args.memory_gib,
                device=args.device,
                arithmetic_only=args.arithmetic_only,
                policies=(args.policies or list(remat.STANDARD)) if args.policies is not None else None,
            )
        )
    raise UsageError(f"unknown command {args.command!r}")  # argparse admits only the commands above.


def format_error(error: BaseException, *, hint: bool = True) -> str:
    """The text `main` prints for a user error: `error: <first line>`, then the message's other lines indented;
    secrets masked (`safety.redact_text`), control characters visible (`safety.printable`)."""
    text = describe_os_error(error) if isinstance(error, OSError) else str(error) or type(error).__name__
    first, *rest = redact_text(text).splitlines() or [type(error).__name__]
    if len(rest) > _MAX_DETAIL_LINES:
        rest = [*rest[:_MAX_DETAIL_LINES], f"... {len(rest) - _MAX_DETAIL_LINES} more lines ({DEBUG_ENV}=1 shows all)"]
    suffix = f" (set {DEBUG_ENV}=1 for the traceback)" if hint else ""
    return "\n".join([f"error: {printable(first)}{suffix}", *(f"  {printable(line.rstrip())}" for line in rest)])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default `sys.argv[1:]`) and returns the process exit code.

    Bad command lines, configs, overrides, files, checkpoints and output folders print one `error: ...` line to
    stderr and return 2 (see the module docstring).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            commands = ["download", "inspect", "train", "predict", "evaluate", "app", "plan", "convert"]
            raise UsageError(f"choose a command: {', '.join(commands)} (paligemma-ft --help for details)")
        return _run_command(args, split_overrides(unknown))
    except SystemExit as e:  # `--help` exits 0 from inside argparse.
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(format_error(e, hint=False), file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else is re-raised.
        if not is_user_error(e) or os.environ.get(DEBUG_ENV):
            raise
        print(format_error(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
