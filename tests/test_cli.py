"""The `scbert` command: subcommands, and errors that print the message a user needs rather than a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def scbert_command() -> list[str]:
    """The installed console script (entry point), else the module it points at."""
    script = Path(sys.executable).with_name("scbert")
    return [str(script)] if script.exists() else [sys.executable, "-m", "train.cli"]


def test_scbert_help_lists_the_subcommands():
    result = run(*scbert_command(), "--help")
    assert result.returncode == 0, result.stderr
    for name in cli.COMMANDS:
        assert name in result.stdout
    finetune_help = run(*scbert_command(), "finetune", "--help")
    assert finetune_help.returncode == 0 and "--label_key" in finetune_help.stdout and "--packed" in finetune_help.stdout


def test_the_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("scbert") == "train.cli:main"


# A feed-forward block run over and over, as inference runs batches: prints the page faults of four forwards after
# eight to warm up. Each forward makes two [16384, 512] float32 activations (32 MB each).
REPEATED_FORWARD_FAULTS = """
import resource, sys, torch
from train import cli
if sys.argv[1] == "keep":
    cli.keep_freed_memory()
torch.set_num_threads(1)
block = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.SiLU(), torch.nn.Linear(512, 128))
x = torch.randn(16384, 128)
with torch.inference_mode():
    for _ in range(8):
        block(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory policy is glibc's (Linux)")
def test_the_command_reuses_freed_memory_instead_of_faulting_it_in_again():
    activation_pages = 16384 * 512 * 4 // os.sysconf("SC_PAGE_SIZE")
    kept = int(run(sys.executable, "-c", REPEATED_FORWARD_FAULTS, "keep").stdout)
    default = int(run(sys.executable, "-c", REPEATED_FORWARD_FAULTS, "default").stdout)
    assert kept < activation_pages // 10, (kept, activation_pages)
    assert default > activation_pages, (default, activation_pages)  # glibc's default, which the command changes


@pytest.mark.parametrize("command, keeps", [("annotate", True), ("finetune", False)])
def test_only_annotate_run_as_the_process_sets_the_memory_policy(monkeypatch, command, keeps):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(command))
    monkeypatch.setattr(sys, "argv", ["scbert", command, "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == ([command] if keeps else [])
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])  # called from Python: the process's policy is not the command's to set
    assert calls == ([command] if keeps else [])


def test_python_m_train_annotate_sets_the_memory_policy_as_scbert_annotate_does(monkeypatch):
    import runpy
    import warnings

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("annotate"))
    monkeypatch.setattr(sys, "argv", ["train/annotate.py", "--help"])
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before, as the suite does
        runpy.run_module("train.annotate", run_name="__main__")
    assert calls == ["annotate"]


def test_an_error_prints_its_message_and_a_traceback_only_with_debug(tmp_path):
    arguments = ["finetune", "--data", str(tmp_path / "missing.h5ad"), "--label_key", "x", "--output_dir", str(tmp_path)]
    plain = run(*scbert_command(), *arguments)
    assert plain.returncode == 1
    assert "missing.h5ad does not exist" in plain.stderr and "Traceback" not in plain.stderr
    assert "--debug" in plain.stderr
    debug = run(*scbert_command(), *arguments, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
    # The module path behaves the same (what `accelerate launch -m train.finetune` runs).
    module = run(sys.executable, "-m", "train.finetune", *arguments[1:])
    assert module.returncode == 1 and "does not exist" in module.stderr and "Traceback" not in module.stderr


def test_the_main_job_names_the_failed_stage_without_burying_its_error(tmp_path):
    result = run(sys.executable, "-m", "train.main", "--data", str(tmp_path / "missing.h5ad"),
                 "--output_dir", str(tmp_path / "main"))
    assert result.returncode == 1
    assert "missing.h5ad does not exist" in result.stderr  # the stage's own message
    assert "train.finetune stage failed" in result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr


def test_key_errors_print_without_quotes():
    assert cli.error_message(KeyError("--label_key 'x' is not a column")) == "--label_key 'x' is not a column"
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(lambda argv: (_ for _ in ()).throw(ValueError("bad value")), [])
    assert exit_info.value.code == 1


def test_accelerate_launch_runs_the_module(baron_small, tmp_path):
    """`accelerate launch -m train.pretrain` (no script path, no sys.path changes) trains and saves."""
    baron_small.write_h5ad(tmp_path / "cells.h5ad")
    result = run(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train.pretrain",
                 "--data", str(tmp_path / "cells.h5ad"), "--architecture", "scbert2-tiny", "--max_length", "32",
                 "--max_steps", "1", "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"),
                 "--num_workers", "0", "--no_progress_bar")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
