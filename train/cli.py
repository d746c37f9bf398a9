"""The `scbert` command: one entry point for the family's tools, each a subcommand with its own flags.

    scbert --help
    scbert finetune --data cells.h5ad --label_key cell_type --output_dir runs/annotate
    scbert finetune --help

Errors print the message a user needs and exit with status 1; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import sys
from typing import Callable

# subcommand -> (module with main(argv), one-line help).
COMMANDS = {
    "pretrain": ("train.pretrain", "pretrain scBERT 2.0 (masked regression) or scBERT (masked language modelling)"),
    "finetune": ("train.finetune", "fine-tune for cell type annotation, next to a logistic-regression baseline"),
    "annotate": ("train.annotate", "annotate cells (.h5ad, 10x .h5 or folder, CSV/TSV) with a fine-tuned folder, "
                 "flagging novel cell types"),
    "distill": ("train.distill", "distil a fine-tuned classifier into a smaller student (fewer layers)"),
    "quantize": ("train.quantize", "int8 (torchao) or ternary (BitNet b1.58) weights for a fine-tuned classifier"),
    "synergy": ("train.synergy", "drug combination synergy from cell-line embeddings: `synergy train|predict`"),
    "perturb": ("train.perturb", "Perturb-seq: predict knock-out effects on control cells: `perturb train|predict`"),
    "convert": ("modeling_scbert.convert_scbert_original_checkpoint",
                "convert the published scBERT checkpoint (.pth) into a Hub folder"),
    "main": ("train.main", "the end-to-end main job: pretrain, fine-tune, compare with the baseline"),
}


# The commands that run with keep_freed_memory. Training commands keep glibc's defaults: fine-tuning ran 1.1x as fast
# with it, but the allocator moves floats in their last bits and a fine-tuning run diverges from there (the main job's
# fine-tuning kept another epoch, 2 test cells apart), so recorded training results would no longer be what their
# commands give.
KEEP_FREED_MEMORY = {"annotate"}
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> None:
    """Makes glibc keep freed memory for reuse instead of handing large blocks back to the system.

    glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh mmap and unmaps it when freed,
    so the kernel faults in and zeroes every page of each large activation again: a batch of 64 cells x 262 tokens
    through scbert2-small's 512-wide feed-forward makes 34 MB tensors, and the kernel took a fifth of the CPU time.
    Measured on 2 cores with batches of 64, annotate's default then (benchmarks/results/annotate_speed): `scbert
    annotate` of 100,000 Baron cells ran at 144 cells/s against 132 with glibc's defaults, in 1.6 GB. With today's
    batches of 32 (17 MB activations) glibc's defaults were not measured again. This is what the jemalloc /
    tcmalloc preload of PyTorch's CPU performance guide does, with nothing to install. Up to 256 MB of freed memory
    stays in the process (512 MB and 1 GB let peak memory grow to 1.9 GB at 100,000 cells). Other C libraries (musl,
    macOS) are left as they are."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def error_message(error: BaseException) -> str:
    # KeyError's str() is the repr of its argument, quotes included.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return text or type(error).__name__


def run_command(main: Callable, argv: list[str] | None = None) -> None:
    """Runs ``main(argv)``; an error ends the process with its message (the traceback only under ``--debug``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        if "--debug" in argv:
            raise
        print(f"error: {error_message(error)}\n(run with --debug for the full traceback)", file=sys.stderr)
        sys.exit(1)


def run_subcommand(command: str, subcommands: dict[str, Callable], doc: str, argv: list[str] | None) -> None:
    """`scbert COMMAND SUB ...` for a tool with subcommands (e.g. `synergy train|predict`)."""
    argv = list(argv or [])
    if argv[:1] in (["-h"], ["--help"]):
        print(doc)
        return
    if not argv or argv[0] not in subcommands:
        raise ValueError(f"Usage: scbert {command} {{{'|'.join(subcommands)}}} ...; got {argv[:1] or 'nothing'}. "
                         f"`scbert {command} {next(iter(subcommands))} --help` lists the flags.")
    subcommands[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> None:
    as_process = argv is None  # the process is this command, so its memory policy is ours to set (not when imported)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="scbert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        subcommands.add_parser(name, help=help_text, add_help=False)
    command = parser.parse_args(argv[:1]).command
    if as_process and command in KEEP_FREED_MEMORY:
        keep_freed_memory()
    run_command(importlib.import_module(COMMANDS[command][0]).main, argv[1:])


if __name__ == "__main__":
    main()
