"""The Hub upload (clo_fast.training.hub): checked at start-up (repo id, token, write access), retried on transient
errors, local files left out; and, for real under DeepSpeed, run by rank 0 after the ranks part, so an upload
longer than train.dist_timeout_s still ends with exit 0. The Hub client is monkeypatched: nothing leaves the
machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from clo_fast.config import ConfigError, load_config
from clo_fast.training import hub

ROOT = Path(__file__).resolve().parents[1]
ME = {"name": "me", "orgs": [{"name": "my-org"}], "auth": {"accessToken": {"role": "write"}}}


def _http_error(status: int) -> HfHubHTTPError:
    import huggingface_hub.errors as errors

    # the Response class of the HTTP library this huggingface_hub uses (httpx or its successor)
    response_cls = sys.modules[errors.HfHubHTTPError.__mro__[1].__module__].Response
    request_cls = sys.modules[errors.HfHubHTTPError.__mro__[1].__module__].Request
    return HfHubHTTPError(f"{status} error", response=response_cls(status, request=request_cls("POST", "http://hub")))


def _cfg(tmp_path, *sets):
    return load_config(
        None, [f"train.output_dir={tmp_path / 'run'}", "train.hub_retry_wait_s=0", "train.push_to_hub=me/clo-sw", *sets]
    )


@pytest.fixture
def token(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_fake")


# ------------------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("repo", ["me/clo-sw", "my-org/clo-sw", "clo-sw"])
def test_a_write_token_for_the_namespace_passes(tmp_path, monkeypatch, token, repo):
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None: ME)
    hub.check_hub_access(_cfg(tmp_path, f"train.push_to_hub={repo}"), "c.yaml")


@pytest.mark.parametrize(
    ("whoami", "message"),
    [
        ({**ME, "auth": {"accessToken": {"role": "read"}}}, "the Hugging Face token is read-only"),
        ({**ME, "name": "you", "orgs": []}, r"token's user 'you' cannot create repositories in 'me'"),
        (_http_error(401), r"token could not be verified \(HfHubHTTPError: 401 error\)"),
    ],
)
def test_a_token_that_cannot_push_is_refused_at_start_up(tmp_path, monkeypatch, token, whoami, message):
    calls = []

    def fake_whoami(self, token=None):
        calls.append(1)
        if isinstance(whoami, Exception):
            raise whoami
        return whoami

    monkeypatch.setattr(HfApi, "whoami", fake_whoami)
    with pytest.raises(ConfigError, match=f"c.yaml: train.push_to_hub: .*{message}"):
        hub.check_hub_access(_cfg(tmp_path), "c.yaml")
    assert len(calls) == 1  # a 401 is not retried


def test_the_token_check_retries_a_hub_that_is_briefly_down(tmp_path, monkeypatch, token):
    answers = [_http_error(503), _http_error(429), ME]

    def flaky(self, token=None):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(HfApi, "whoami", flaky)
    hub.check_hub_access(_cfg(tmp_path), "c.yaml")
    assert answers == []


@pytest.mark.parametrize(
    ("repo", "message"),
    [("me/clo sw", "not a Hub repo id"), ("a/b/c", "not a Hub repo id"), ("me/--x", "not a Hub repo id")],
)
def test_a_bad_repo_id_is_refused_when_the_config_loads(tmp_path, repo, message):
    with pytest.raises(ConfigError, match=f"train.push_to_hub: {message}"):
        _cfg(tmp_path, f"train.push_to_hub={repo}")
    with pytest.raises(ConfigError, match="train.push_to_hub: uploads the export: needs train.export_hf: true"):
        _cfg(tmp_path, "train.export_hf=false")


# ------------------------------------------------------------------------------------------- upload
def _export_folders(tmp_path):
    from clo_fast.atomic import OWNER_MARKER
    from clo_fast.training.card import SUMMARY_FILE

    for name in ("hf_model", "hf_adapter"):
        folder = tmp_path / "run" / name
        folder.mkdir(parents=True)
        for f in ("README.md", "config.json", OWNER_MARKER, SUMMARY_FILE):
            (folder / f).write_text("{}")


def test_upload_retries_transient_errors_and_leaves_local_files_out(tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    _export_folders(tmp_path)
    calls, failures = [], [_http_error(502), ConnectionError("reset")]

    def upload_folder(self, **kw):
        calls.append(("upload", kw["repo_id"]))
        if failures:
            raise failures.pop(0)
        files = [str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file()]
        calls.append(("sent", sorted(filter_repo_objects(files, ignore_patterns=kw["ignore_patterns"]))))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    hub.push_to_hub(_cfg(tmp_path, "model.lora={r: 2}"), log=lambda *_: None)
    sent = ["README.md", "config.json"]  # no .clo_fast_output marker, no run summary (local paths)
    assert calls == [
        ("create", "me/clo-sw"),
        ("upload", "me/clo-sw"),
        ("upload", "me/clo-sw"),
        ("upload", "me/clo-sw"),
        ("sent", sent),
        ("create", "me/clo-sw-adapter"),
        ("upload", "me/clo-sw-adapter"),
        ("sent", sent),
    ]


def test_upload_gives_up_after_the_retries_and_never_retries_a_refusal(tmp_path, monkeypatch):
    _export_folders(tmp_path)
    tries = []

    def failing(error):
        def upload_folder(self, **kw):
            tries.append(1)
            raise error

        return upload_folder

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", failing(_http_error(503)))
    with pytest.raises(HfHubHTTPError, match="503"):
        hub.push_to_hub(_cfg(tmp_path, "train.hub_max_retries=2"), log=lambda *_: None)
    assert len(tries) == 3
    tries.clear()
    monkeypatch.setattr(HfApi, "upload_folder", failing(_http_error(403)))
    with pytest.raises(HfHubHTTPError, match="403"):
        hub.push_to_hub(_cfg(tmp_path), log=lambda *_: None)
    assert len(tries) == 1


# ----------------------------------------------------------------------- two ranks, an upload past the timeout
FAKE_HUB = """
    # Loaded by every process of the test's launch (sitecustomize): the Hub client answers from here.
    import json, os, time
    from pathlib import Path
    import huggingface_hub

    record = Path(os.environ["FAKE_HUB_RECORD"])

    def whoami(self, token=None):
        return {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, **kw):
        with record.open("a") as f:
            f.write(json.dumps({"create": repo_id, "pid": os.getpid()}) + "\\n")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kw):
        time.sleep(float(os.environ["FAKE_HUB_UPLOAD_S"]))  # longer than train.dist_timeout_s
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent = list(huggingface_hub.utils.filter_repo_objects(files, ignore_patterns=ignore_patterns))
        readme = (Path(folder_path) / "README.md").read_text()
        with record.open("a") as f:
            f.write(json.dumps({"upload": repo_id, "files": sent, "readme": readme, "pid": os.getpid()}) + "\\n")

    huggingface_hub.HfApi.whoami = whoami
    huggingface_hub.HfApi.create_repo = create_repo
    huggingface_hub.HfApi.upload_folder = upload_folder
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_an_upload_longer_than_the_collective_timeout_still_exits_0(tmp_path, demo_cache):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(FAKE_HUB))
    record, timeout_s, upload_s = tmp_path / "hub.jsonl", 15, 35
    sets = {
        "train.output_dir": tmp_path / "run",
        "data.output_dir": tmp_path / "data",
        "eval.output_dir": tmp_path / "eval",
        "data.cache_dir": demo_cache,
        "optim.max_steps": 2,
        "train.save_steps": 0,
        "train.eval_steps": 0,
        "train.dist_timeout_s": timeout_s,
        "train.push_to_hub": "me/clo-demo",
    }
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "clo_fast" / "train.py")]
    cmd += ["--config", str(ROOT / "configs" / "demo.yaml")] + [
        a for k, v in sets.items() for a in ("--set", f"{k}={v}")
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRITON_INTERPRET")}
    env |= {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), str(ROOT), os.environ.get("PYTHONPATH")])),
        "FAKE_HUB_RECORD": str(record),
        "FAKE_HUB_UPLOAD_S": str(upload_s),
        "HF_TOKEN": "hf_fake",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1200)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    events = [json.loads(line) for line in record.read_text().splitlines()]
    (upload,) = [e for e in events if "upload" in e]
    assert upload["upload"] == "me/clo-demo" and [e["create"] for e in events if "create" in e] == ["me/clo-demo"]
    assert ".clo_fast_output" not in upload["files"] and "clo_training_summary.json" not in upload["files"]
    assert "README.md" in upload["files"] and "config.json" in upload["files"]
    assert str(tmp_path) not in upload["readme"]  # no local path in the uploaded card
    assert "uploaded hf_model to https://huggingface.co/me/clo-demo" in r.stderr
