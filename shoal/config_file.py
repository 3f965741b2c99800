"""Options from a file: ``shoal serve --config FILE`` (YAML or JSON), one key per option."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_mapping(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file (JSON if it ends in ``.json``); ValueError naming the file and the
    problem (never its content: it may hold secrets)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"{p}: {exc.strerror}") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ValueError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top")
    return data


def option_defaults(path: str | os.PathLike, options: set[str]) -> dict:
    """The file's values keyed by option name (``max-num-seqs`` or ``max_num_seqs``); ValueError for
    a key that names no option of ``options``."""
    values = {str(k).replace("-", "_"): v for k, v in read_mapping(path).items()}
    unknown = sorted(set(values) - options)
    if unknown:
        raise ValueError(f"{path}: unknown options {', '.join(unknown)} (options are those of --help, e.g. max_num_seqs)")
    return values
