"""Where an HF model comes from: a local folder, or a model id fetched with ``huggingface_hub``.

A model id is downloaded with ``snapshot_download`` limited to the files conversion reads (config,
tokenizer, safetensors weights), into the ordinary HF cache, so ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE`` behave as they do for every other HF tool.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from dataclasses import dataclass

from chatloop import progress
from converters.errors import ConvertError

log = logging.getLogger(__name__)

# Only what conversion reads: Mistral repos also ship ``consolidated.safetensors``, a second full copy of
# the weights, and many repos carry PyTorch ``.bin`` files or ``original/`` folders we never look at.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


@dataclass(frozen=True)
class HFSource:
    local_dir: pathlib.Path  # folder holding config.json, tokenizer files and safetensors
    model_id: str  # "org/name" for a hub model, the folder name for a plain local folder
    revision: str | None  # commit hash when known, else the requested branch or tag


def resolve_source(source: str, revision: str | None = None) -> HFSource:
    """A local HF folder or an HF model id, checked to hold everything conversion needs."""
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        path = path.resolve()
        check_folder(path)
        model_id, commit = _cache_identity(path)
        if revision and revision != commit:
            log.warning("--revision %s is ignored for a local folder (%s)", revision, path)
        return HFSource(local_dir=path, model_id=model_id or path.name, revision=commit)
    if path.exists():
        raise ConvertError(f"{source}: not a folder or a .gguf file")
    if not _REPO_ID.match(source):
        raise ConvertError(f"{source}: no such file or folder, and not a Hugging Face model id (org/name)")
    local = _download(source, revision)
    check_folder(local)
    commit = local.name if _COMMIT.match(local.name) else None
    return HFSource(local_dir=local, model_id=source, revision=commit or revision)


def check_folder(folder: pathlib.Path) -> None:
    """Raise ``ConvertError`` naming the first thing an HF folder lacks."""
    if not (folder / "config.json").is_file():
        raise ConvertError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ConvertError(f"{folder}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    has_weights = (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))
    if not has_weights:
        hint = " (PyTorch .bin checkpoints are not supported)" if any(folder.glob("*.bin")) else ""
        raise ConvertError(f"{folder}: no model weights (*.safetensors){hint}")


def model_name_for(folder: pathlib.Path) -> str:
    """``org/name`` for a snapshot in an HF cache, else the folder's name."""
    model_id, _ = _cache_identity(folder.resolve())
    return model_id or folder.resolve().name


def _cache_identity(path: pathlib.Path) -> tuple[str | None, str | None]:
    """``("org/name", commit)`` when ``path`` is a snapshot folder inside an HF cache."""
    m = _CACHE_SNAPSHOT.search(path.as_posix())
    if not m:
        return None, None
    return f"{m['org']}/{m['name']}", m["commit"]


def _download(repo_id: str, revision: str | None) -> pathlib.Path:
    # NOTE: imported here so a local folder or a GGUF never pays for the hub client's import.
    import huggingface_hub  # noqa: PLC0415
    from huggingface_hub import constants, errors  # noqa: PLC0415

    offline = constants.HF_HUB_OFFLINE
    token = os.environ.get("HF_TOKEN") or None
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    log.info("fetching %s (config, tokenizer, safetensors)%s", where, " from the local cache" if offline else "")
    progress.configure_hub()  # download bars on a terminal only
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, token=token)
    except errors.GatedRepoError as exc:
        if token:
            raise ConvertError(
                f"{repo_id} is a gated repository and HF_TOKEN has no access: accept its terms on huggingface.co"
            ) from exc
        raise ConvertError(
            f"{repo_id} is a gated repository: accept its terms on huggingface.co and set HF_TOKEN"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise ConvertError(f"{repo_id}: revision {revision!r} not found") from exc
    except errors.RepositoryNotFoundError as exc:
        hint = "" if token else " (a private repository needs HF_TOKEN)"
        raise ConvertError(f"{repo_id}: no such model on the Hugging Face Hub{hint}") from exc
    except errors.IncompleteSnapshotError as exc:
        raise ConvertError(f"{where}: the cached copy is incomplete and the Hub cannot be reached") from exc
    except errors.LocalEntryNotFoundError as exc:
        cache = constants.HF_HUB_CACHE
        if offline:
            raise ConvertError(f"{where}: HF_HUB_OFFLINE is set and no cached copy is in {cache}") from exc
        raise ConvertError(f"{where}: the Hugging Face Hub is unreachable and no cached copy is in {cache}") from exc
    except errors.HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConvertError(f"{where}: download failed ({first})") from exc
    return pathlib.Path(path)
