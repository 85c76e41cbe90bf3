"""Data: tokenizers, text corpora as TFDS sources, and the Grain pipeline that packs them into batches."""

from llmx.data.pipeline import batches, process_rows
from llmx.data.prepare import PreparedData, check_sources, prepare_data
from llmx.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "PreparedData", "batches", "build_tokenizer", "check_sources", "process_rows",
    "prepare_data",
]
