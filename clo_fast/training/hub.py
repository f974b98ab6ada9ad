"""The Hub upload of an export (train.push_to_hub): checked at start-up (repo id, token, write access to the
namespace), run by rank 0 after the ranks have parted (no collective timeout applies to a long upload), retried
with back-off on transient errors (tenacity), and without local files (the ownership marker, the run summary)."""

from __future__ import annotations

import os
from pathlib import Path

from clo_fast.atomic import OWNER_MARKER
from clo_fast.config import ConfigError, RunConfig
from clo_fast.logs import get_logger
from clo_fast.training.card import SUMMARY_FILE

# files of an export folder that stay local: clo_fast's ownership marker, and the run summary (local paths)
LOCAL_ONLY_FILES = [OWNER_MARKER, SUMMARY_FILE]
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


def _retryable(e: BaseException) -> bool:
    """Transport errors, and HTTP statuses that say "later" (408, 429, 5xx); not a 401/403/404 (retrying will not
    help). huggingface_hub raises HfHubHTTPError for statuses, and its HTTP library's errors (an HTTPError it
    re-exports: httpx's or requests') for a connection that failed."""
    from huggingface_hub import errors

    if isinstance(e, errors.HfHubHTTPError):
        response = getattr(e, "response", None)
        return response is None or response.status_code in RETRY_STATUSES
    return isinstance(e, (getattr(errors, "HTTPError", ConnectionError), ConnectionError, TimeoutError))


def _retrying(cfg: RunConfig):
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

    t = cfg.train
    return Retrying(
        retry=retry_if_exception(_retryable),
        stop=stop_after_attempt(t.hub_max_retries + 1),
        wait=wait_exponential(multiplier=t.hub_retry_wait_s, max=120.0) + wait_random(0, t.hub_retry_wait_s),
        reraise=True,
    )


def check_hub_access(cfg: RunConfig, where: str) -> None:
    """Before any work: the Hub is reachable (not HF_HUB_OFFLINE), a token exists and is valid (whoami), it may write
    (not a read-only token), and the repo's namespace is the token's user or one of its organisations."""
    repo = cfg.train.push_to_hub
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"{where}: train.push_to_hub: {repo!r} cannot be uploaded with HF_HUB_OFFLINE set; "
            "unset it, or set train.push_to_hub: null"
        )
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise ConfigError(
            f"{where}: train.push_to_hub: no Hugging Face token (set HF_TOKEN, or run `hf auth login`); "
            "or set train.push_to_hub: null"
        )
    try:
        me = _retrying(cfg)(HfApi().whoami, token=token)
    except Exception as e:  # an invalid token (401) or no way to reach the Hub after the retries
        raise ConfigError(
            f"{where}: train.push_to_hub: the Hugging Face token could not be verified ({type(e).__name__}: {e}); "
            "log in again (`hf auth login`) or set train.push_to_hub: null"
        ) from None
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ConfigError(f"{where}: train.push_to_hub: the Hugging Face token is read-only; use a write token")
    namespace = repo.split("/")[0] if "/" in repo else me.get("name")
    allowed = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    if namespace not in allowed:
        raise ConfigError(
            f"{where}: train.push_to_hub: {repo!r}: the token's user {me.get('name')!r} cannot create repositories "
            f"in {namespace!r} (its namespaces: {', '.join(sorted(n for n in allowed if n))})"
        )


def hub_targets(cfg: RunConfig) -> list[tuple[Path, str]]:
    """(folder, repo id) pairs of an upload: hf_model to train.push_to_hub; with LoRA, hf_adapter to <id>-adapter."""
    out, repo = Path(cfg.train.output_dir), cfg.train.push_to_hub
    targets = [(out / "hf_model", repo)]
    if cfg.model.lora is not None:
        targets.append((out / "hf_adapter", f"{repo}-adapter"))
    return targets


def push_to_hub(cfg: RunConfig, log=None) -> None:
    """Upload the export folders (hf_model, and hf_adapter with LoRA), each retried on transient errors; rank 0
    only, after the process group is gone. An upload that is retried sends again only what the Hub lacks."""
    from huggingface_hub import HfApi

    api, retrying = HfApi(), _retrying(cfg)
    for folder, repo_id in hub_targets(cfg):
        retrying(api.create_repo, repo_id, private=cfg.train.hub_private, exist_ok=True)
        retrying(
            api.upload_folder,
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message="clo-fast export",
            ignore_patterns=LOCAL_ONLY_FILES,
        )
        (log or get_logger("train").info)(f"uploaded {folder.name} to https://huggingface.co/{repo_id}")
