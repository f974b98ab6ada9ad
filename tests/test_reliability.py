"""Issue #15: nothing a user owns is lost, nothing silently wrong. In-process checks of the guards; the
DeepSpeed-launching one is marked slow."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from clo_fast.atomic import OWNER_MARKER, OutputDirError, RunLock, atomic_directory, claim_output_dir, publish
from clo_fast.config import ConfigError, RunConfig, load_config, to_dict


# ------------------------------------------------------------------------------------ data loss
def test_atomic_directory_refuses_to_replace_a_folder_it_did_not_create(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="not created by clo_fast"), atomic_directory(mine, "data") as tmp:
        (tmp / "x").write_text("new")
    assert (mine / "precious.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".tmp-*"))


def test_publish_refuses_a_foreign_target_and_replaces_its_own(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    staging = tmp_path / ".tmp-out"
    staging.mkdir()
    with pytest.raises(OutputDirError):
        publish(staging, target, "data")
    assert (target / "precious.txt").read_text() == "keep"
    # a folder we published is ours: replacing it is allowed
    other = tmp_path / "ours"
    for content in ("v1", "v2"):
        with atomic_directory(other, "data") as tmp:
            (tmp / "v").write_text(content)
    assert (other / "v").read_text() == "v2" and (other / OWNER_MARKER).is_file()


def test_save_text_dataset_into_a_user_folder_is_refused(tmp_path):
    import datasets

    from clo_fast.data.build import save_text_dataset

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"a": ["x"]})})
    from clo_fast.data.sources import DataError

    with pytest.raises(DataError, match=r"data.output_dir: .*mine: output folder exists and was not created"):
        save_text_dataset(dsd, {}, mine)
    assert (mine / "precious.txt").read_text() == "keep"


def test_output_dir_dot_parent_file_and_read_only_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "something.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not created by clo_fast"), atomic_directory(".", "data"):
        pass
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputDirError, match="parent is a file"):
        claim_output_dir(tmp_path / "afile" / "run", "train.output_dir", "train_run")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputDirError, match="permission denied|not writable"):
                claim_output_dir(ro / "run", "train.output_dir", "train_run")
        finally:
            ro.chmod(0o700)


def test_run_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / ".clo_fast.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()  # stale: its pid is gone
    assert json.loads((tmp_path / ".clo_fast.lock").read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / ".clo_fast.lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(OutputDirError, match="another-host"):
        RunLock(tmp_path).acquire()


def _cfg(tmp_path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path / "run")
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_fresh_run_into_a_folder_with_checkpoints_refuses_unless_resume_or_overwrite(tmp_path):
    from clo_fast.training.checkpoint import prepare_output_dir

    cfg = _cfg(tmp_path)
    prepare_output_dir(cfg, None).release()  # a new folder: created and marked
    assert (tmp_path / "run" / OWNER_MARKER).is_file()
    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="--resume"):
        prepare_output_dir(cfg, None)
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    prepare_output_dir(cfg, "latest").release()
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    prepare_output_dir(_cfg(tmp_path, overwrite_output_dir=True), None).release()
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a folder the user made is refused whatever the flags
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cfg.train.output_dir = str(foreign)
    with pytest.raises(OutputDirError):
        prepare_output_dir(cfg, "latest")


def test_rotation_keeps_the_newest_and_never_removes_later_checkpoints(tmp_path):
    from clo_fast.training.checkpoint import rotate_checkpoints

    for s in (2, 4, 6, 20):  # step_20: left by an earlier, longer run
        (tmp_path / f"step_{s:08d}").mkdir()
    removed = rotate_checkpoints(tmp_path, "step_00000006", keep=2)
    assert removed == ["step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006", "step_00000020"]


# ------------------------------------------------------------------------------------ integrity
def _fake_checkpoint(root, tag, cfg, world=1):
    from clo_fast.training.checkpoint import write_checksums

    d = root / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": world, "config": to_dict(cfg)}))
    write_checksums(d)
    return d


def test_resume_names_the_corrupt_file_and_the_newest_good_tag(tmp_path):
    from clo_fast.training.checkpoint import checkpoint_root, load_checkpoint

    cfg = _cfg(tmp_path)
    root = checkpoint_root(cfg)
    _fake_checkpoint(root, "step_00000002", cfg)
    bad = _fake_checkpoint(root, "step_00000004", cfg)
    (root / "latest").write_text("step_00000004")
    (bad / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))  # corrupted after the save
    with pytest.raises(ConfigError, match=r"mp_rank_00_model_states\.pt.*sha256.*--resume step_00000002"):
        load_checkpoint(engine=None, cfg=cfg, which="latest")
    (bad / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    with pytest.raises(ConfigError, match="step_00000002"):
        load_checkpoint(engine=None, cfg=cfg, which="step_00000004")


def test_resume_refuses_a_world_size_change_and_a_model_change_states_the_rest(tmp_path, capsys):
    from clo_fast.training.checkpoint import check_resume_compatible

    saved = _cfg(tmp_path)
    state = {"world_size": 2, "config": to_dict(saved)}
    with pytest.raises(ConfigError, match="written by 2 ranks, this run has 1"):
        check_resume_compatible(state, saved, tmp_path)
    state["world_size"] = 1
    now = _cfg(tmp_path)
    now.model.name_or_path = "other/model"
    with pytest.raises(ConfigError, match="model.name_or_path"):
        check_resume_compatible(state, now, tmp_path)
    now = _cfg(tmp_path)
    now.optim.lr, now.clo.beta = 1e-3, 0.3
    changes = check_resume_compatible(state, now, tmp_path)
    assert changes == {"clo.beta": (0.1, 0.3), "optim.lr": (5e-5, 1e-3)}
    out = capsys.readouterr().out
    assert "optim.lr: 5e-05 → 0.001" in out and "clo.beta: 0.1 → 0.3" in out


def test_a_new_lr_on_resume_rebases_the_schedule(tmp_path):
    from types import SimpleNamespace

    from clo_fast.training.checkpoint import apply_optimizer_config
    from clo_fast.training.optim import build_optimizer

    cfg = _cfg(tmp_path)
    cfg.optim.warmup_steps, total = 2, 10
    model = torch.nn.Linear(3, 3)
    opt, sched = build_optimizer(model, cfg.optim, total)
    for _ in range(5):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    cfg.optim.lr = 1e-3  # the resumed run's config
    opt2, sched2 = build_optimizer(model, cfg.optim, total)
    opt2.load_state_dict(state_opt)  # what the checkpoint load does: the old LR comes back
    sched2.load_state_dict(state_sched)
    lr_multiplier = sched2.lr_lambdas[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-5 * lr_multiplier(5))
    apply_optimizer_config(SimpleNamespace(optimizer=opt2, lr_scheduler=sched2), cfg, {"optim.lr": (5e-5, 1e-3)})
    expected = 1e-3 * lr_multiplier(5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(6))


# ------------------------------------------------------------------------------------ security
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


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field", ["optim.lr=.inf", "clo.beta=.inf", "optim.eps=.nan", "optim.betas=[0.9, .nan]"])
def test_float_fields_reject_inf_and_nan(field):
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, [field])


def test_exponent_without_dot_is_a_number():
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("flag", ["optim.lr=[", "optim.lr.x=1"])
def test_malformed_overrides_are_config_errors(flag):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [flag])


# ------------------------------------------------------------------------------------ non-finite guard
def test_guard_names_the_first_step_with_a_non_finite_loss():
    from clo_fast.training.step import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"))
    for step, loss in ((1, 0.7), (2, 0.6)):
        guard.observe(step, {"loss": torch.tensor(loss)})
    guard.check(2, grad_norm=1.5)  # all finite: silent
    for step, loss in ((3, float("nan")), (4, float("inf")), (5, 0.5)):
        guard.observe(step, {"loss": torch.tensor(loss)})
    with pytest.raises(NonFiniteError, match="^step 3: the training loss is not finite"):
        guard.check(5, grad_norm=1.0)


@pytest.mark.parametrize("norm", [float("nan"), float("inf"), torch.tensor(float("inf"))])
def test_guard_stops_on_a_non_finite_gradient_norm(norm):
    from clo_fast.training.step import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"))
    guard.observe(7, {"loss": torch.tensor(0.3)})
    with pytest.raises(NonFiniteError, match="^step 7: the gradient norm"):
        guard.check(7, grad_norm=norm)
    guard.check(7, grad_norm=None)  # clipping disabled: DeepSpeed reports no norm


# ------------------------------------------------------------------------------------ ops
def _head(V=11, N=6, H=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("bad_label", [11, 12, -5])
def test_labels_outside_the_vocabulary_are_errors(impl, bad_label):
    from clo_fast.ops import linear_logprobs, sequence_logprobs

    x, w = _head()
    y = torch.tensor([0, 3, bad_label, -100, 10, 1])
    with pytest.raises(ValueError, match=rf"labels\[2\] = {bad_label} is outside the vocabulary \[0, 11\)"):
        linear_logprobs(x, w, y, impl=impl)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequence_logprobs(x.view(2, 3, 8), w, y.view(2, 3), impl=impl)
    y[2] = 10  # the largest valid id, and ignore_index, pass
    assert torch.isfinite(linear_logprobs(x, w, y, impl=impl)).all()


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.5])
def test_invalid_chunk_rows_are_errors(chunk_rows):
    from clo_fast.ops import linear_logprobs

    x, w = _head()
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        linear_logprobs(x, w, torch.zeros(6, dtype=torch.long), impl="torch", chunk_rows=chunk_rows)


def test_triton_without_cuda_or_interpreter_says_so(monkeypatch):
    from clo_fast.ops import linear_logprobs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = _head()
    with pytest.raises(ValueError, match="needs CUDA tensors .* or TRITON_INTERPRET=1"):
        linear_logprobs(x, w, torch.zeros(6, dtype=torch.long), impl="triton")


def test_empty_vocabulary_is_an_error():
    from clo_fast.ops import linear_logprobs

    x, w = _head(V=0)
    with pytest.raises(ValueError, match="V = 0"):
        linear_logprobs(x, w, torch.full((6,), -100), impl="torch")


def test_host_token_range_check_names_the_position():
    from clo_fast.data.collate import check_token_range, collate_clo

    ex = {"input_ids": [[1, 2, 3]] * 4, "labels": [[-100, 2, 3]] * 4}
    batch = collate_clo([ex], pad_token_id=0, pad_to_multiple_of=1)
    check_token_range(batch, vocab_size=4, where="step 1")
    with pytest.raises(ValueError, match=r"step 1: input_ids\[0, 2\] = 3 is outside .*\[0, 3\)"):
        check_token_range(batch, vocab_size=3, where="step 1")


# ------------------------------------------------------------------------------------ data
def _pairs_cfg(tmp_path, source, **kw):
    from clo_fast.config import DataConfig

    return DataConfig(
        source=str(source),
        target_lang="sw",
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _record(i, q=None):
    q = q or f"Question number {i}?"
    return {"instruction": q, "response": f"Answer {i}.", "instruction_sw": f"Swali {i}?", "response_sw": f"Jibu {i}."}


def test_duplicate_prompts_are_removed_before_the_split_and_counted(tmp_path):
    from clo_fast.data import build_text_dataset

    recs = [_record(i) for i in range(20)]
    recs += [_record(100 + i, q=f"  question NUMBER {i}? ") for i in range(10)]  # same prompts, other spacing/case
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    dsd, summary = build_text_dataset(_pairs_cfg(tmp_path, src, eval_fraction=0.3), progress=False)
    assert summary["duplicate_prompts_removed"] == 10
    assert len(dsd["train"]) + len(dsd["eval"]) == 20
    train = {" ".join(p.split()).casefold() for p in dsd["train"]["prompt_en"]}
    held_out = {" ".join(p.split()).casefold() for p in dsd["eval"]["prompt_en"]}
    assert held_out and not train & held_out


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_line_is_named_and_honours_on_bad_record(tmp_path, suffix):
    from clo_fast.data import build_text_dataset
    from clo_fast.data.sources import DataError

    lines = [json.dumps(_record(i)).encode() for i in range(5)]
    lines[2] = b'{"instruction": "caf\xe9", "response": "x", "instruction_sw": "y", "response_sw": "z"}'
    src = tmp_path / f"latin1{suffix}"
    src.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"latin1{suffix}: line 3: not valid UTF-8 \(byte 0xe9"):
        build_text_dataset(_pairs_cfg(tmp_path, src), progress=False)
    dsd, summary = build_text_dataset(_pairs_cfg(tmp_path, src, on_bad_record="skip"), progress=False)
    assert summary["skipped_bad_records"] == {"bad_encoding": 1}
    assert len(dsd["train"]) + len(dsd["eval"]) == 4


def test_non_utf8_csv_names_the_line(tmp_path):
    from clo_fast.data import build_text_dataset
    from clo_fast.data.sources import DataError

    src = tmp_path / "latin1.csv"
    src.write_bytes(b"instruction,response,instruction_sw,response_sw\nHi,Ok,x,y\ncaf\xe9,Ok,x,y\n")
    with pytest.raises(DataError, match=r"latin1.csv: line 3: not valid UTF-8"):
        build_text_dataset(_pairs_cfg(tmp_path, src), progress=False)


def test_an_empty_split_is_an_error():
    from clo_fast.data.split import require_examples

    require_examples("train", 3, "unused")
    with pytest.raises(ConfigError, match="the eval split has no examples: all 4 prompts are longer"):
        require_examples("eval", 0, "all 4 prompts are longer than data.max_length (8 tokens)")


# ------------------------------------------------------------------------------------ secrets
def test_a_judge_endpoint_echoing_headers_leaks_no_key_into_the_report(tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from clo_fast.evaluate.judge import run_judge
    from clo_fast.evaluate.report import write_report

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):  # an endpoint that answers with the request's headers and path
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"echo": dict(self.headers), "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key, url_key = "sk-test-" + "k" * 24, "querysecret123"
    monkeypatch.setenv("CLO_TEST_JUDGE_KEY", key)
    cfg = RunConfig()
    cfg.eval.judge_endpoint = f"http://127.0.0.1:{server.server_port}/v1?api-key={url_key}"
    cfg.eval.judge_api_key_env = "CLO_TEST_JUDGE_KEY"
    items = [{"lang": "en", "prompt": "Hi"}]
    try:
        judge = run_judge(cfg, items, {"base": ["a"], "trained": ["b"]}, ["en"])
    finally:
        server.shutdown()
    assert judge["results"]["trained"]["base"]["en"]["errors"] == 2  # both orders
    report = {"eval_config": to_dict(cfg)["eval"], "judge": judge, "models": {}, "languages": ["en"]}
    report.update(target_lang="sw", n_prompts={"en": 1})
    files = write_report(report, [], tmp_path)
    from pathlib import Path

    written = Path(files["json"]).read_text() + Path(files["markdown"]).read_text()
    assert "unexpected judge reply" in written  # the error is kept, without its secrets
    assert key not in written and url_key not in written
    assert "127.0.0.1" in written


def test_redaction_keeps_ordinary_text():
    from clo_fast.evaluate.report import redact_secrets

    assert redact_secrets({"m": ["tokens/s 12", "eval/loss 0.5"]}) == {"m": ["tokens/s 12", "eval/loss 0.5"]}
    assert redact_secrets("https://u:p@h/v1?key=1 Authorization: Bearer abc") == (
        "https://<redacted>@h/v1?<redacted> Authorization: <redacted> <redacted>"
    )


def test_judge_url_keeps_the_query_string_after_the_path():
    from clo_fast.evaluate.judge import judge_url

    assert judge_url("http://h/v1/?api-key=x") == "http://h/v1/chat/completions?api-key=x"
    assert judge_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_and_leaves_the_folder_reusable(tmp_path):
    """2 CPU ranks through the deepspeed launcher; the loss of step 2 turns NaN (the test hook: an LR that would
    diverge is refused by the config now): the run stops naming the step, writes no checkpoint and no export,
    and releases its lock."""
    from test_train import launch

    extra = (
        "optim.max_steps=4",
        "train.save_steps=0",
        "train.eval_steps=0",
        "train.run_evaluation=false",
    )
    r = launch(tmp_path, tmp_path / "cache", extra=extra, env={"CLO_FAST_TEST_NONFINITE": "2"})
    assert r.returncode != 0
    assert "[train] stopped: step 2:" in r.stderr and "not finite" in r.stderr
    run = tmp_path / "run"
    assert (run / OWNER_MARKER).is_file()
    assert not (run / "checkpoints").exists() and not (run / "hf_model").exists()
    assert not (run / ".clo_fast.lock").exists()


@pytest.mark.parametrize("field", ["translation_num_beams", "translation_batch_size", "translation_max_length"])
def test_translation_sizes_must_be_positive(field):
    with pytest.raises(ConfigError, match=f"data.{field}: must be >= 1, got 0"):
        load_config(None, [f"data.{field}=0"])


def test_a_failed_checkpoint_write_names_the_folder_and_the_free_space(tmp_path):
    from types import SimpleNamespace

    from clo_fast.training.checkpoint import save_checkpoint

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed: basic_ios::clear")

    cfg = _cfg(tmp_path)
    with pytest.raises(OSError, match=r"\.tmp-step_00000003: writing checkpoint step_00000003 failed .* GiB free"):
        save_checkpoint(SimpleNamespace(save_checkpoint=disk_full), cfg, 3, {})
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


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
    """Two gloo ranks in-process: with node-local folders (each rank its own), every rank stops with a clear
    error; with one shared folder both go on and the probes are removed."""
    import torch.multiprocessing as mp

    folders = [tmp_path / "a", tmp_path / "a" if shared else tmp_path / "b"]
    for f in folders:
        f.mkdir(exist_ok=True)
    results = mp.Manager().dict()
    mp.spawn(_probe_worker, args=(str(tmp_path / "init"), [str(f) for f in folders], results), nprocs=2)
    if shared:
        assert dict(results) == {0: "ok", 1: "ok"}
    else:
        for r in (0, 1):
            assert "rank 0 cannot see the files written there by rank(s) [1]" in results[r]
            assert "one filesystem shared by every node" in results[r]
    assert not list(tmp_path.rglob(".probe-*"))


def test_run_records_store_no_key_given_in_a_url():
    cfg = RunConfig()
    cfg.eval.judge_endpoint = "https://user:pw@judge.example/v1?api-key=abc123"
    assert to_dict(cfg)["eval"]["judge_endpoint"] == "https://<redacted>@judge.example/v1?<redacted>"
    assert cfg.eval.judge_endpoint.endswith("abc123")  # the run itself still uses it


# ------------------------------------------------------------------- the last cryptic tracebacks
def test_missing_local_model_path_is_named_not_taken_for_a_hub_id(tmp_path):
    from clo_fast.config import ConfigError
    from clo_fast.pretrained import resolve_model_path

    missing = tmp_path / "models" / "my-llama"
    with pytest.raises(ConfigError, match=r"model.name_or_path: local model folder not found: .*my-llama"):
        resolve_model_path(str(missing))
    assert resolve_model_path("owner/name") == "owner/name"  # a hub id is passed on as it is


def test_corrupt_translation_cache_names_the_file_and_is_kept(tmp_path):
    from clo_fast.data.translate import TranslationCache, TranslationError

    path = tmp_path / "translations.sqlite"
    path.write_bytes(b"this is not a database, just 64 bytes of something else entirely.")
    with pytest.raises(TranslationError, match=r"translations.sqlite: the translation cache cannot be read"):
        TranslationCache(path)
    assert path.read_bytes().startswith(b"this is not a database")  # the user's file is left as it was


def test_an_empty_tokenized_split_is_never_cached(tmp_path):
    """Every prompt over max_length: the split is empty (the trainer raises), and it is not cached for a rerun."""
    from clo_fast.config import DataConfig
    from clo_fast.data import build_text_dataset, tokenize_dataset
    from clo_fast.demo_model import demo_texts, train_tokenizer

    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "data"), max_length=8)
    texts, _ = build_text_dataset(cfg, progress=False)
    out = tokenize_dataset(texts["eval"], train_tokenizer(demo_texts()), cfg)
    assert len(texts["eval"]) > 0 and len(out) == 0
    cache = tmp_path / "cache" / "tokenized"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


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
