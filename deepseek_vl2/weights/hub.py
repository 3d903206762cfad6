"""Hub resolution: a local checkpoint directory, or a Hugging Face hub repo id downloaded or taken
from the local hub cache (offline, or when the hub cannot be reached)."""
import logging
import os
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

PROCESSOR_PATTERNS = ["*.json", "*.model", "*.txt"]  # configs and tokenizer files
HUB_PATTERNS = PROCESSOR_PATTERNS + ["*.safetensors"]
HUB_PROBE_TIMEOUT_S = 4.0
OFFLINE_ADVICE = ("pass a local checkpoint directory instead, or run `python -m deepseek_vl2.offline_checkpoint "
                  "--out DIR` to make a random-weight test checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, unreadable shards, wrong tensors."""


def resolve_checkpoint_dir(path_or_repo_id, allow_patterns=HUB_PATTERNS, **hub_kwargs) -> Path:
    """A local checkpoint directory, or a hub repo id: downloaded (the files matching
    `allow_patterns`), or taken from the local hub cache when the hub is off or cannot be reached."""
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise CheckpointError(f"checkpoint directory {repo_id!r} does not exist (and is not a hub repo id)")
    from huggingface_hub import constants, snapshot_download

    allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only",
                                                             "force_download", "proxies") and v is not None}
    if allowed.get("local_files_only") or _hub_offline(constants):
        cached = _cached_snapshot(repo_id, allow_patterns, allowed)
        if cached is None:
            raise CheckpointError(f"{repo_id!r} is not a local directory, and it is not in the local Hugging Face "
                                  f"cache ({allowed.get('cache_dir') or constants.HF_HUB_CACHE}), which is all "
                                  f"that is used offline (HF_HUB_OFFLINE or local_files_only): {OFFLINE_ADVICE}")
        return cached
    # Without a network the hub client can wait on each connection and retry for a long time: ask
    # the endpoint once, briefly, and go to the local cache if it does not answer.
    if "proxies" not in allowed and not _hub_answers(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S):
        cached = _cached_snapshot(repo_id, allow_patterns, allowed)
        if cached is None:
            raise CheckpointError(f"{repo_id!r} is not a local directory, the Hugging Face hub ({constants.ENDPOINT}) "
                                  f"cannot be reached, and the local cache does not hold it: {OFFLINE_ADVICE}")
        logger.warning("the Hugging Face hub (%s) cannot be reached: using the cached %s", constants.ENDPOINT, cached)
        return cached
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, **allowed))
    except Exception as err:  # noqa: BLE001  (network, auth and not-found errors all end here)
        raise CheckpointError(f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face hub "
                              f"failed: {err} (to work without the hub: {OFFLINE_ADVICE})") from err


def _hub_offline(constants) -> bool:
    check = getattr(constants, "is_offline_mode", None)  # huggingface_hub >= 1.0; before, the constant
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def _cached_snapshot(repo_id: str, allow_patterns, allowed: dict) -> Optional[Path]:
    """The repo's snapshot in the local hub cache, if there is one with the files asked for."""
    from huggingface_hub import snapshot_download

    options = {k: v for k, v in allowed.items() if k in ("revision", "cache_dir")}
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True, **options))
    except (OSError, ValueError):  # LocalEntryNotFoundError (an OSError) in every huggingface_hub version
        return None
    if "*.safetensors" in allow_patterns and not any(folder.glob("*.safetensors")):
        return None  # only the processor's files were fetched into it
    return folder


def _hub_answers(endpoint: str, timeout: float) -> bool:
    """Whether the hub endpoint answers at all (any HTTP status, even a TLS failure, counts) within
    `timeout` seconds. In a thread, as name resolution does not obey socket timeouts; through
    urllib, which uses the same proxy environment variables as the hub client."""
    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, OSError) as err:
            if not isinstance(getattr(err, "reason", err), ssl.SSLError):
                return  # refused, unresolvable, unroutable or timed out
        except Exception:  # noqa: BLE001  (an unexpected probe failure must not block a download)
            pass
        answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)

