"""Data: raw text corpora in, model-ready token batches out.

`corpora` turns a corpus name, file, folder or glob into documents; `lm` turns token ids into next-token
(input, target) pairs, in memory (the book's sliding window) or from prepared token files (memory maps).
Classification, instruction and preference datasets will sit beside them as their own modules.
"""

from llmscratch.data.corpora import (
    CORPORA,
    NAMED_DOWNLOADS,
    NamedCorpus,
    cache_dir,
    download,
    fetch_corpus,
    load_corpus,
    pydocs_documents,
    pydocs_text,
    read_text_file,
    resolve_source,
)
from llmscratch.data.lm import (
    SPLITS,
    SlidingWindowDataset,
    TokenMemmap,
    TokenMeta,
    create_dataloader,
    prepare_tokens,
    read_meta,
)

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
    "load_corpus",
    "prepare_tokens",
    "pydocs_documents",
    "pydocs_text",
    "read_meta",
    "read_text_file",
    "resolve_source",
]
