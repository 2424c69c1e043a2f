"""Data for SFT and long-document training: row formats -> messages (formats), chat templates
and loss masks (templates), file readers (sources), and the Grain pipeline (pipeline)."""

from covenant_jax.data.formats import SKIP_REASONS, InvalidRow, RowFormat
from covenant_jax.data.pipeline import (
    DataPipeline,
    DataReport,
    SourceReport,
    build_pipeline,
    default_config,
)
from covenant_jax.data.sources import read_rows
from covenant_jax.data.templates import (
    NAMED_TEMPLATES,
    ChatTemplate,
    encode_chat,
    encode_chats,
    encode_text,
    encode_texts,
)

__all__ = [
    "SKIP_REASONS",
    "InvalidRow",
    "RowFormat",
    "DataPipeline",
    "DataReport",
    "SourceReport",
    "build_pipeline",
    "default_config",
    "read_rows",
    "NAMED_TEMPLATES",
    "ChatTemplate",
    "encode_chat",
    "encode_chats",
    "encode_text",
    "encode_texts",
]
