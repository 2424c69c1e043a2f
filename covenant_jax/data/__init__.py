"""Data for SFT and long-document training: row formats -> messages (formats), chat templates
and loss masks (templates), file readers (sources), preparation in parallel processes and its
on-disk cache (prepare, cache), and the Grain pipeline (pipeline).

Names are imported on first use, so the preparation processes (prepare.py) load what turns rows
into tokens and not the Grain/JAX side.
"""

import importlib

_EXPORTS = {
    "SKIP_REASONS": "formats",
    "InvalidRow": "formats",
    "RowFormat": "formats",
    "DataPipeline": "pipeline",
    "DataReport": "pipeline",
    "SourceReport": "pipeline",
    "build_pipeline": "pipeline",
    "default_config": "pipeline",
    "read_rows": "sources",
    "iter_rows": "sources",
    "NAMED_TEMPLATES": "templates",
    "ChatTemplate": "templates",
    "encode_chat": "templates",
    "encode_chats": "templates",
    "encode_text": "templates",
    "encode_texts": "templates",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
