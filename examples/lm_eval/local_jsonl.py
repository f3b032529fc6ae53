"""Load a task's jsonl files named relative to this directory (lm-eval ``custom_dataset``).

A task YAML here says ``custom_dataset: !function local_jsonl.load`` and names its files in
``dataset_kwargs: {data_files: {test: espace_tiny.jsonl}}``; they are read from beside the
YAML whatever the working directory, with no download and no dataset cache.
"""

import json
from pathlib import Path


def load(data_files, **_metadata):
    """``{split: datasets.Dataset}`` from ``{split: jsonl path}``; bad lines name file and line."""
    import datasets

    out = {}
    for split, name in data_files.items():
        path = Path(__file__).parent / name
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        out[split] = datasets.Dataset.from_list(rows)
    return out
