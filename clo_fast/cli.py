"""`clo-fast`: one command for all of clo-fast (console script); each subcommand is also a `python -m` module.

    clo-fast train --config demo                                        # one process: a CPU try-out, one GPU
    clo-fast train --nproc 8 --config configs/llama3_8b_sw.yaml         # deepspeed --num_gpus 8 .../train.py ...
    clo-fast train --hostfile hostfile --nnodes 2 --nproc 8 --config ...   # deepspeed starts every node (ssh)
    clo-fast train --launcher torchrun --nnodes 2 --node-rank R --master-addr NODE0 --master-port P --nproc 8 \\
        --config ...                                                    # the same command on every node, R = 0, 1
    clo-fast data --config demo [--export-format trl]    clo-fast eval --config demo --model base=... --model clo=...
    clo-fast compare --config world    clo-fast merge-adapter ADAPTER OUT    clo-fast world

`clo-fast train` prints the launcher command it runs, then runs it; `deepspeed clo_fast/train.py ...` and the other
launchers of the README work as before.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from clo_fast.logs import add_log_level_argument, get_logger, setup_logging

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
LAUNCHERS = ("auto", "deepspeed", "torchrun")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The training script's options (clo_fast/train.py); `clo-fast train` lists them beside its launcher's."""
    from clo_fast.config import add_override_argument, config_file  # imports torch: not for `clo-fast --help`

    p.add_argument(
        "--config",
        required=True,
        type=config_file,
        help="run config YAML, or a shipped config by name (demo, world ...; configs/demo.yaml shows every field)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint in <output_dir>/checkpoints: a tag, or 'latest' (default)",
    )
    p.add_argument(
        "--resume-unverified",
        action="store_true",
        help="resume from a checkpoint that has no checksums.json (older clo_fast): its files are not verified",
    )
    p.add_argument(
        "--callback",
        action="append",
        default=None,
        metavar="MODULE:ATTR",
        help="a training callback to run in the loop (clo_fast/training/callbacks.py), repeatable; default: "
        "$CLO_FAST_CALLBACKS (comma-separated), which reaches every rank through any launcher",
    )
    add_override_argument(p)
    add_log_level_argument(p)  # passed on to the script, which sets it up on each rank


def _launcher_parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clo-fast train",
        description="Train: starts clo_fast/train.py under a launcher (the command is printed first).",
        add_help=add_help,
        allow_abbrev=False,  # --conf must not be taken for a launcher flag; it is the script's
    )
    g = p.add_argument_group("launcher")
    g.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="auto",
        help="auto (default): one process → plain python, else deepspeed; deepspeed; torchrun",
    )
    g.add_argument("--nproc", type=int, help="processes per node (default: the CUDA devices here, else 1)")
    g.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--node-rank", type=int, help="this node's rank, with several nodes: run the command on each node")
    g.add_argument("--master-addr", help="node 0's address (several nodes)")
    g.add_argument("--master-port", type=int, help="node 0's rendezvous port (launcher default: 29500)")
    g.add_argument("--hostfile", help="deepspeed: one node per line (`node1 slots=8`); deepspeed starts them over ssh")
    g.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return p


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 1


def train_command(a: argparse.Namespace, run_argv: Sequence[str]) -> list[str]:
    """The launcher command for `clo-fast train`'s flags (`a`), the script's own arguments after it."""
    nproc = a.nproc if a.nproc is not None else _default_nproc()
    if nproc < 1 or a.nnodes < 1:
        raise ValueError("--nproc and --nnodes must be >= 1")
    if a.node_rank is not None and not 0 <= a.node_rank < a.nnodes:
        raise ValueError(f"--node-rank {a.node_rank}: must be in [0, {a.nnodes}) (--nnodes {a.nnodes})")
    launcher = a.launcher
    if launcher == "auto":
        launcher = "python" if nproc == 1 and a.nnodes == 1 and not a.hostfile else "deepspeed"
    if launcher == "python":  # one process: rank 0 of 1 on a free local port (training.distributed), no launcher
        cmd = [sys.executable]
    elif launcher == "deepspeed":
        if a.nnodes > 1 and not a.hostfile:
            raise ValueError(
                "--nnodes > 1 with deepspeed needs --hostfile (one node per line); or use --launcher torchrun "
                "with --node-rank and --master-addr on each node"
            )
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if a.hostfile:
            cmd += ["--hostfile", a.hostfile, "--num_nodes", str(a.nnodes)]
        cmd += ["--num_gpus", str(nproc)]
        if a.node_rank is not None:  # each node started by hand: deepspeed's no-ssh mode
            cmd += ["--no_ssh", "--node_rank", str(a.node_rank)]
        if a.master_addr:
            cmd += ["--master_addr", a.master_addr]
        if a.master_port:
            cmd += ["--master_port", str(a.master_port)]
    else:
        if a.hostfile:
            raise ValueError("--hostfile is deepspeed's: with torchrun run the command on each node with --node-rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(a.nnodes)]
        if a.nnodes > 1:
            if a.node_rank is None or not a.master_addr:
                raise ValueError("torchrun with --nnodes > 1 needs --node-rank and --master-addr (node 0's address)")
            cmd += ["--node_rank", str(a.node_rank), "--rdzv-endpoint", f"{a.master_addr}:{a.master_port or 29500}"]
        elif a.master_port:
            cmd += ["--master_port", str(a.master_port)]
        else:
            cmd += ["--standalone"]  # a free port of its own
    return [*cmd, str(TRAIN_SCRIPT), *run_argv]


def train(argv: Sequence[str]) -> int:
    argv = list(argv)
    if {"-h", "--help"} & set(argv):
        full = _launcher_parser(add_help=True)
        add_train_arguments(full.add_argument_group("training (clo_fast/train.py)"))
        full.print_help()
        return 0
    from clo_fast.config import parse_args_with_overrides

    launch, run_argv = _launcher_parser(add_help=False).parse_known_args(argv)
    check = argparse.ArgumentParser(prog="clo-fast train", allow_abbrev=False)
    add_train_arguments(check)
    setup_logging(parse_args_with_overrides(check, run_argv).log_level)  # a bad flag fails here, not in N processes
    try:
        cmd = train_command(launch, run_argv)
    except ValueError as e:
        get_logger().error(f"clo-fast train: error: {e}")
        return 2
    print("[clo-fast] " + shlex.join(cmd), flush=True)
    if launch.dry_run:
        return 0
    return subprocess.call(cmd)


def _data(argv):
    from clo_fast.data.cli import main

    return main(argv)


def _eval(argv):
    from clo_fast.evaluate.cli import main

    return main(argv)


def _compare(argv):
    from clo_fast.compare import cli

    return cli(argv)


def _merge_adapter(argv):
    from clo_fast.merge_adapter import main

    return main(argv)


def _world(argv):
    from clo_fast.world import main

    main(argv)
    return 0


# name → (what it does, the function taking the rest of the command line)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "train": ("train (DeepSpeed ZeRO-3 under deepspeed or torchrun; prints the command it runs)", train),
    "data": ("build a cross-lingual dataset; --export-format trl for TRL (python -m clo_fast.data)", _data),
    "eval": ("evaluate models side by side (python -m clo_fast.evaluate)", _eval),
    "compare": ("SFT vs SFT→DPO vs CLO over seeds (python -m clo_fast.compare)", _compare),
    "merge-adapter": ("merge a LoRA adapter into its base model (python -m clo_fast.merge_adapter)", _merge_adapter),
    "world": ("build the miniature fact world and its base model (python -m clo_fast.world)", _world),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:14} {what}" for name, (what, _) in COMMANDS.items())
    usage = f"usage: clo-fast COMMAND [options]   (clo-fast COMMAND --help lists its options)\n\ncommands:\n{listing}"
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + usage)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        get_logger().error(f"clo-fast: unknown command {argv[0]!r}\n{usage}")
        return 2
    return COMMANDS[argv[0]][1](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
