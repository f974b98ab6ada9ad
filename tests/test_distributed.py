"""clo_fast.training.distributed: launchers and process groups, RNG state, one shared output folder,
computed_on_rank0."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clo_fast.config import ConfigError
from clo_fast.training.distributed import launch_mismatch


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    from clo_fast.training.distributed import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_pickle_planted_as_rng_state_is_not_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "rng.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "rng.pt", weights_only=True)
    assert not (tmp_path / "pwned").exists()


def _probe_worker(rank, init_file, folders, results):
    import torch.distributed as tdist

    from clo_fast.training.distributed import check_shared_output_dir

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_shared_output_dir(folders[rank])
        results[rank] = "ok"
    except ConfigError as e:
        results[rank] = str(e)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_every_rank_must_see_one_shared_output_dir(tmp_path, shared):
    """Two gloo ranks in-process: with node-local folders (each rank its own; rank 1's "node" does not even have
    the folder rank 0 made), every rank stops with a clear error and nothing is left behind on rank 1's; with one
    shared folder both go on and the probes are removed."""
    import torch.multiprocessing as mp

    folders = [tmp_path / "a", tmp_path / "a" if shared else tmp_path / "b"]
    folders[0].mkdir()
    results = mp.Manager().dict()
    mp.spawn(_probe_worker, args=(str(tmp_path / "init"), [str(f) for f in folders], results), nprocs=2)
    if shared:
        assert dict(results) == {0: "ok", 1: "ok"}
    else:
        for r in (0, 1):
            assert "rank 0 cannot see the files written there by rank(s) [1]" in results[r]
            assert "one filesystem shared by every node" in results[r]
        assert not folders[1].exists()
    assert not list(tmp_path.rglob(".probe-*"))


def _rank0_worker(rank, init_file, results):
    import torch.distributed as tdist

    from clo_fast.training.distributed import computed_on_rank0

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    try:
        value = computed_on_rank0(lambda: calls.append(rank) or {"hashed_by": rank})
        try:
            computed_on_rank0(lambda: 1 / 0)
            failed = None
        except RuntimeError as e:
            failed = str(e)
        results[rank] = (value, calls, failed)
    finally:
        tdist.destroy_process_group()


def test_computed_on_rank0_runs_once_and_hands_the_result_or_the_error_to_every_rank(tmp_path):
    """The reference cache key hashes the model's files on rank 0 only; the others get the same key, and an
    error there reaches every rank instead of leaving them to a collective timeout."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_rank0_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0] == ({"hashed_by": 0}, [0], "on rank 0: ZeroDivisionError: division by zero")
    assert results[1] == ({"hashed_by": 0}, [], "on rank 0: ZeroDivisionError: division by zero")


@pytest.mark.slow  # starts processes for several seconds
def test_plain_python_gets_a_one_process_group_without_mpi():
    """`python clo_fast/train.py` has no launcher environment: DeepSpeed would go to MPI discovery (mpi4py)."""
    import os
    import subprocess
    import sys

    from clo_fast.training.distributed import LAUNCHER_ENV

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    code = (
        "from clo_fast.training.distributed import init_process_group; import torch.distributed as d; "
        "dev = init_process_group(); print('group', d.get_rank(), d.get_world_size(), dev.type)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "group 0 1 cpu" in r.stdout


def test_launcher_environment_is_left_alone(monkeypatch):
    from clo_fast.training.distributed import single_process_env

    monkeypatch.setenv("RANK", "3")
    assert single_process_env() == {}
    monkeypatch.delenv("RANK")
    env = single_process_env()
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0


# -------------------- Launchers that did not start the processes they were asked for stop at start-up with a cle
ROOT = Path(__file__).resolve().parents[1]
# what each launcher puts in a worker's environment (accelerate 1.x, torchrun, deepspeed's launch.py)
ACCELERATE_SIMPLE_2 = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}
ACCELERATE_SIMPLE_1 = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}
TORCHRUN_4 = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}
DEEPSPEED_4 = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}
ACCELERATE_MULTI_GPU_2 = {**TORCHRUN_4, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_accelerate_asked_for_several_processes_but_started_one():
    why = launch_mismatch(ACCELERATE_SIMPLE_2, 0, ["accelerate", "launch", "--num_processes", "2", "train.py"])
    assert "accelerate launch was asked for --num_processes 2 but started this one process" in why
    assert "deepspeed --num_gpus 2" in why and "accelerate launch --multi_gpu --num_processes 2" in why
    why = launch_mismatch(ACCELERATE_SIMPLE_2, 1, ["accelerate", "launch", "--num-processes=3", "train.py"])
    assert "--num_processes 3" in why
    # the number came from an accelerate config file, not the command line: still refused
    assert "asked for several processes" in launch_mismatch(ACCELERATE_SIMPLE_2, 0, [])


@pytest.mark.parametrize(
    ("env", "devices"),
    [
        ({}, 0),  # plain python: one process
        ({}, 1),
        (ACCELERATE_SIMPLE_1, 0),  # accelerate launch with one process
        (TORCHRUN_4, 0),  # CPU ranks (gloo): no device per rank needed
        (TORCHRUN_4, 4),
        (DEEPSPEED_4, 8),
        (ACCELERATE_MULTI_GPU_2, 2),  # accelerate --multi_gpu runs torchrun
    ],
)
def test_launches_that_got_what_they_asked_for_pass(env, devices):
    assert launch_mismatch(env, devices, ["accelerate", "launch", "--num_processes", "2"]) is None


@pytest.mark.parametrize(
    ("env", "devices", "asked"),
    [(TORCHRUN_4, 2, 4), (DEEPSPEED_4, 1, 4), ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, 2)],
)
def test_more_processes_per_node_than_cuda_devices_are_refused(env, devices, asked):
    why = launch_mismatch(env, devices, [])
    assert f"started {asked} processes on this node but {devices} CUDA device(s) are visible" in why


@pytest.mark.slow  # starts processes for several seconds
def test_accelerate_launch_with_two_processes_on_one_cpu_stops_at_start_up(tmp_path):
    """The issue's command, for real: accelerate's simple launcher starts one process; it exits 2 naming the fix,
    before the data stage (no output folder is made)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}  # no accelerate config file
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "2"]
        + [str(ROOT / "clo_fast" / "train.py")]
        + ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode != 0
    assert "[train] config error: accelerate launch was asked for --num_processes 2" in r.stderr, r.stderr[-3000:]
    assert "1 rank(s)" not in r.stdout + r.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ a torch-extension build lock left by a killed run
def _planted_lock(root: Path, built: bool) -> Path:
    op = root / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    if built:
        (op / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF complete")
    lock = op / "lock"
    lock.touch()
    return lock


def test_a_stale_extension_lock_is_cleared_and_a_held_one_kept(tmp_path):
    from clo_fast.training.distributed import clear_stale_extension_locks

    lock = _planted_lock(tmp_path / "built", built=True)  # the op built, its builder killed before releasing
    (note,) = clear_stale_extension_locks(tmp_path / "built")
    assert not lock.exists() and f"removed a stale torch-extension build lock {lock}" in note

    lock = _planted_lock(tmp_path / "old", built=False)  # killed mid-build, long ago
    os.utime(lock, (1_000_000, 1_000_000))
    (note,) = clear_stale_extension_locks(tmp_path / "old")
    assert not lock.exists() and "s old" in note

    lock = _planted_lock(tmp_path / "young", built=False)  # may be a build under way: named with its command
    (note,) = clear_stale_extension_locks(tmp_path / "young")
    assert lock.exists() and f"rm {lock}" in note

    lock = _planted_lock(tmp_path / "held", built=True)  # a live builder holds it open (torch's FileBaton does)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; f = open({str(lock)!r}); print(1, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        holder.stdout.readline()  # the file is open now
        (note,) = clear_stale_extension_locks(tmp_path / "held")
        assert lock.exists() and f"held by pid {holder.pid}" in note
    finally:
        holder.kill()
        holder.wait()


def test_init_process_group_clears_a_stale_lock_before_deepspeed_waits_on_it(tmp_path, monkeypatch, capsys):
    """The check runs where the run starts DeepSpeed, on the TORCH_EXTENSIONS_DIR DeepSpeed builds in: DeepSpeed
    (stood in for) finds no lock to wait on."""
    import deepspeed

    from clo_fast.training import distributed

    lock = _planted_lock(tmp_path / "ext", built=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # restored after the test
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    seen = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.append(lock.exists()))
    assert distributed.init_process_group().type == "cpu"
    assert seen == [False] and f"removed a stale torch-extension build lock {lock}" in capsys.readouterr().err


# ------------------------------------------------------------------ two nodes simulated on one machine (torchrun)
def _port_in_range() -> int:
    """A free port in 29900-29999 (other jobs on the test machines use the launchers' default 29500)."""
    import socket

    for port in random.sample(range(29900, 30000), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 29900-29999")


def _train_node(node_rank: int, port: int, out: Path, cache: Path, work: Path, *, nnodes=2, nproc=1, extra=()):
    """`clo-fast train` for one node of the demo run (two steps), started in the background; its log in `work`."""
    import shutil

    from helpers import ROOT

    launch = ["--nnodes", str(nnodes), "--nproc", str(nproc), "--master-port", str(port)]  # one node: deepspeed
    if nnodes > 1:
        launch += ["--launcher", "torchrun", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1"]
    sets = [f"train.output_dir={out}", f"data.output_dir={work / 'data'}", f"data.cache_dir={cache}"]
    sets += ["optim.max_steps=2", "train.run_evaluation=false", "train.eval_steps=0", "train.export_hf=false", *extra]
    cmd = [shutil.which("clo-fast") or str(Path(sys.executable).parent / "clo-fast"), "train", *launch]
    cmd += ["--config", str(ROOT / "configs" / "demo.yaml"), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "node.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait(procs, timeout=600) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # a hung node: stopped, so the test fails instead of leaving it running
                p.kill()


def _first_loss(run: Path) -> float:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return next(r["loss"] for r in rows if r.get("step") == 1 and "loss" in r)


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_the_demo_like_one_node(tmp_path, demo_cache, demo_model_dir):
    """Two `torchrun --nnodes 2 --node_rank {0,1} --rdzv-endpoint 127.0.0.1:PORT` processes (gloo), one rank each,
    each node with its own local cache folder (the demo model copied in, as on separate machines) and the output
    folder shared: two steps, the same first-step loss as one node with two ranks (`clo-fast train --nproc 2`, the
    deepspeed launcher). With node-local output folders every rank stops at the shared-filesystem probe."""
    import shutil

    caches = []
    for node in (0, 1):
        caches.append(tmp_path / f"node{node}" / "cache")
        shutil.copytree(Path(demo_cache) / "demo_model", caches[-1] / "demo_model")
    one = tmp_path / "one_node" / "run"
    rc = _wait([_train_node(0, _port_in_range(), one, caches[0], tmp_path / "one_node", nnodes=1, nproc=2)])
    log = (tmp_path / "one_node" / "node.log").read_text()
    assert rc == [0], log[-4000:]
    assert "-m deepspeed.launcher.runner --num_gpus 2 --master_port" in log

    shared, port = tmp_path / "shared" / "run", _port_in_range()
    nodes = [_train_node(n, port, shared, caches[n], tmp_path / f"node{n}") for n in (0, 1)]
    rcs = _wait(nodes)
    logs = [(tmp_path / f"node{n}" / "node.log").read_text() for n in (0, 1)]
    assert rcs == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "--nnodes 2 --node_rank 1 --rdzv-endpoint 127.0.0.1:" in logs[1]
    assert "2 rank(s) on cpu (gloo)" in logs[0]
    assert _first_loss(shared) == _first_loss(one)

    port = _port_in_range()  # not shared: each node its own output folder
    nodes = [_train_node(n, port, tmp_path / f"local{n}" / "run", caches[n], tmp_path / f"local{n}") for n in (0, 1)]
    rcs = _wait(nodes)
    logs = [(tmp_path / f"local{n}" / "node.log").read_text() for n in (0, 1)]
    assert rcs[0] != 0 and rcs[1] != 0
    for log in logs:
        assert "rank 0 cannot see the files written there by rank(s) [1]" in log, log[-3000:]
