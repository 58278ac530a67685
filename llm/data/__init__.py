"""Data: text -> sentencepiece ids -> packed rows -> resumable, per-process batches.

Typical use (see DESIGN.md):

  tokenizer = get_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  train = build_dataset(cfg.data, tokenizer, cfg.data.train_split)
  batches = BatchIterator(train, cfg.data.batch_size, cfg.data.shuffle_seed, state=saved)
"""

from llm.data.corpus import embedded_documents
from llm.data.iterator import BatchIterator, eval_batches
from llm.data.packing import build_dataset, pack_documents
from llm.data.source_mixture import train_batches
from llm.data.sources import DataError, load_documents
from llm.data.tokenizer import (Tokenizer, get_tokenizer, install_tokenizer, tokenizer_source,
                                train_tokenizer)

__all__ = [
    "BatchIterator", "DataError", "Tokenizer", "build_dataset", "embedded_documents",
    "eval_batches", "get_tokenizer", "install_tokenizer", "load_documents", "pack_documents",
    "tokenizer_source", "train_batches", "train_tokenizer",
]
