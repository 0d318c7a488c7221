"""What a checkpoint's layout says about the model: its config, and a tied output head left unsaved."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError
from common.safetensors_io import CheckpointIndex

HEAD = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def read_config(model_dir: Path, required: bool = True) -> dict:
    """config.json of a model folder ({} when absent and not required)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        if required:
            raise UserError(f"model {model_dir}: no config.json")
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{config_path}: invalid JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: not a JSON object")
    return config


def tied_embedding(checkpoint: CheckpointIndex, config: dict) -> str | None:
    """The input embedding the output head is tied to, when the checkpoint leaves the head out."""
    if HEAD in checkpoint or not config.get("tie_word_embeddings", True):
        return None
    embeddings = [n for n in checkpoint.names() if n.endswith(EMBEDDING_SUFFIXES)]
    return embeddings[0] if len(embeddings) == 1 else None
