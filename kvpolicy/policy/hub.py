"""Policy folders on the Hugging Face Hub: `load_policy("org/name")` reads one through the Hub's own cache.

Only the files a policy folder deploys are fetched (config.json, model.safetensors, README.md). Offline
(HF_HUB_OFFLINE=1, or no network) a folder already in the Hub cache is used as it is; anything else is one line that
says how to get the folder where there is a network.
"""

from __future__ import annotations

from pathlib import Path

from kvpolicy.errors import KVPError

FILES = ("config.json", "model.safetensors", "README.md")


def download_policy(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of the policy `repo_id` on the Hub (downloaded into the Hub cache when needed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(FILES)))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KVPError(f"cannot fetch policy '{repo_id}' from the Hugging Face Hub ({reason}); where there is a "
                       f"network run `huggingface-cli download {repo_id} --local-dir DIR` and pass DIR") from None
