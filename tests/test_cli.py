"""The `clo-fast` console script (clo_fast/cli.py): its subcommands, their help, and the launcher commands that
`clo-fast train` builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clo_fast import cli

ROOT = Path(__file__).resolve().parent.parent


def test_the_console_script_is_installed_and_lists_every_subcommand():
    script = Path(sys.executable).parent / "clo-fast"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("train", "data", "eval", "compare", "merge-adapter", "world"):
        assert f"\n  {name} " in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--nproc", "--nnodes", "--node-rank", "--launcher", "--hostfile", "--config", "--resume", "--set"]),
        ("data", ["--config", "--tokenizer", "--no-tokenize", "--export-format"]),
        ("eval", ["--config", "--model", "--versus"]),
        ("compare", ["--config", "--seeds", "--launcher"]),
        ("merge-adapter", ["adapter", "out", "--base", "--dtype"]),
        ("world", ["--out", "--cache-dir", "--pretrain-steps"]),
    ],
)
def test_each_subcommand_help_lists_its_options(command, options, capsys):
    try:
        rc = cli.main([command, "--help"])
    except SystemExit as e:  # argparse's own --help exits 0
        rc = e.code
    assert rc == 0
    text = capsys.readouterr().out
    missing = [o for o in options if o not in text]
    assert not missing, text


def test_an_unknown_subcommand_is_refused_with_the_list(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "merge-adapter" in err


def _dry_run(argv, capsys):
    rc = cli.main(["train", "--dry-run", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_one_process_runs_the_script_with_plain_python(capsys):
    rc, out, _ = _dry_run(["--config", "demo", "--set", "optim.max_steps=2"], capsys)
    assert rc == 0
    script = str(ROOT / "clo_fast" / "train.py")
    assert out.strip() == f"[clo-fast] {sys.executable} {script} --config demo --set optim.max_steps=2"


def test_several_processes_go_through_deepspeeds_launcher(capsys):
    rc, out, _ = _dry_run(["--nproc", "2", "--master-port", "29911", "--config", "demo", "--resume"], capsys)
    assert rc == 0
    assert "-m deepspeed.launcher.runner --num_gpus 2 --master_port 29911 " in out
    assert out.rstrip().endswith("train.py --config demo --resume")
    rc, out, _ = _dry_run(["--hostfile", "hosts", "--nnodes", "2", "--nproc", "8", "--config", "demo"], capsys)
    assert "--hostfile hosts --num_nodes 2 --num_gpus 8 " in out


def test_torchrun_on_several_nodes_names_the_node_and_the_rendezvous(capsys):
    argv = ["--launcher", "torchrun", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]
    rc, out, _ = _dry_run([*argv, "--master-port", "29912", "--nproc", "4", "--config", "demo"], capsys)
    assert rc == 0
    assert "-m torch.distributed.run --nproc_per_node 4 --nnodes 2 --node_rank 1 --rdzv-endpoint 10.0.0.1:29912 " in out


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--nnodes", "2", "--nproc", "1"], "--nnodes > 1 with deepspeed needs --hostfile"),
        (["--launcher", "torchrun", "--nnodes", "2", "--nproc", "1"], "needs --node-rank and --master-addr"),
        (["--launcher", "torchrun", "--nnodes", "2", "--node-rank", "2", "--nproc", "1"], "--node-rank 2: must be"),
        (["--launcher", "torchrun", "--hostfile", "h", "--nproc", "1"], "--hostfile is deepspeed's"),
    ],
)
def test_launch_flags_that_cannot_work_are_refused_before_anything_starts(argv, error, capsys):
    rc, out, err = _dry_run([*argv, "--config", "demo"], capsys)
    assert rc == 2 and error in err and "[clo-fast]" not in out


def test_a_bad_config_name_fails_in_the_launcher_naming_the_shipped_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dry-run", "--config", "demoo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "demoo: no such file, and no shipped config by that name" in err and "demo, " in err
