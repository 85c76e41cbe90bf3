"""Data: tokenizers, text corpora as TFDS sources, and the Grain pipeline that packs them into batches."""

from llmx.data.pipeline import BATCH_KEYS, batches
from llmx.data.sources import prepare
from llmx.data.tokenizer import ByteTokenizer, build_tokenizer

__all__ = ["BATCH_KEYS", "ByteTokenizer", "batches", "build_tokenizer", "prepare"]
