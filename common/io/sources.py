"""Where a model or adapter lives: a local folder, or a hub id resolved through huggingface_hub's cache."""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import UserError

# Only weights in safetensors form, JSON configs and tokenizer files are ever fetched: no pickles.
MODEL_FILES = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.tiktoken"]
ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json", "*/adapter_model.safetensors", "*/*.json"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(name_or_path: str, what: str, patterns: list[str]) -> Path:
    """A local folder or file as given, else a hub id resolved to its snapshot folder in the cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(name_or_path) or name_or_path.endswith((".json", ".safetensors", ".bin")):
        raise UserError(f"{what} {name_or_path}: no such file or folder")
    return _from_hub(name_or_path, what, patterns)


def _from_hub(repo_id: str, what: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # huggingface_hub before 2.x has no such check
        IncompleteSnapshotError = ()  # noqa: N806

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except IncompleteSnapshotError:
        raise UserError(f"{what} {repo_id}: the cached snapshot is incomplete; download it again online") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{what} {repo_id}: no such local folder, and not in the Hugging Face cache while offline"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {repo_id}: no such local folder, and the hub lookup failed: {first_line}") from None


def resolve_model(name_or_path: str, what: str = "model") -> Path:
    return resolve_source(name_or_path, what, MODEL_FILES)


def resolve_adapter(name_or_path: str) -> Path:
    return resolve_source(name_or_path, "adapter", ADAPTER_FILES)
