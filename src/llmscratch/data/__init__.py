"""Data: raw text corpora in, model-ready token batches out.

`corpora` turns a corpus name, file, folder or glob into documents; `lm` turns token ids into next-token
(input, target) pairs, in memory (the book's sliding window) or from prepared token files (memory maps).
Classification (`labelled`), instruction (`instruct`, `synth`) and preference (`preference`) data sit beside them;
`files` reads what they share: UTF-8 text, JSON lists and JSONL of records. `cache_dir` and `download` are
re-exported from `llmscratch.download`.
"""

from llmscratch.data.corpora import (
    CORPORA,
    NAMED_DOWNLOADS,
    NamedCorpus,
    fetch_corpus,
    iter_corpus,
    load_corpus,
    pydocs_documents,
    pydocs_text,
    resolve_source,
)
from llmscratch.data.files import read_text_file
from llmscratch.data.lm import (
    SPLITS,
    SlidingWindowDataset,
    TokenMemmap,
    TokenMeta,
    create_dataloader,
    prepare_tokens,
    read_meta,
)
from llmscratch.download import cache_dir, download

__all__ = [
    "CORPORA",
    "NAMED_DOWNLOADS",
    "SPLITS",
    "NamedCorpus",
    "SlidingWindowDataset",
    "TokenMemmap",
    "TokenMeta",
    "cache_dir",
    "create_dataloader",
    "download",
    "fetch_corpus",
    "iter_corpus",
    "load_corpus",
    "prepare_tokens",
    "pydocs_documents",
    "pydocs_text",
    "read_meta",
    "read_text_file",
    "resolve_source",
]
