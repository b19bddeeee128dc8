"""Token ids of tiktoken's cl100k_base decoded back to their text: what LangChain's
`OpenAIEmbeddings` sends by default (it tokenizes every text with tiktoken, cl100k_base for any
model name tiktoken does not know, and posts the ids), read as the OpenAI API reads them.

The ids cannot be told from the model's own tokenizer's ids (both are plain integers), so this
reading has a route of its own (`/tiktoken/v1/embeddings`); `/v1/embeddings` keeps vLLM's reading.

tiktoken downloads its BPE file on first use, which an offline machine cannot do. The file is
looked up where tiktoken caches it (`TIKTOKEN_CACHE_DIR`, `DATA_GYM_CACHE_DIR`, tiktoken's
default cache folders), then in the copy llama-index-core ships: never downloaded, and checked
against its published SHA-256. Both come with the `[tiktoken]` extra; without it this route answers
501 naming the extra.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from services.common.errors import ErrorCode, MeshError, invalid

ENCODING = "cl100k_base"
# tiktoken's cache key (sha1 of the file's URL) and the file's SHA-256, both as tiktoken has them.
_CACHE_KEY = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# cl100k_base's pattern and special tokens, as tiktoken_ext.openai_public defines them (its
# constructor would download the file); decoding uses neither, tiktoken's Encoding needs both.
_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


def candidate_files() -> list[Path]:
    """Where the BPE file may be, first match wins: tiktoken's own cache folders, then the copy
    llama-index-core ships under `_static/tiktoken_cache`."""
    folders = [os.environ.get(name) for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")]
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folders += [str(Path(cache_home) / "tiktoken"), str(Path(tempfile.gettempdir()) / "data-gym-cache")]
    spec = importlib.util.find_spec("llama_index.core")
    if spec is not None and spec.submodule_search_locations:
        folders += [str(Path(p) / "_static" / "tiktoken_cache") for p in spec.submodule_search_locations]
    return [Path(f) / _CACHE_KEY for f in folders if f]


@functools.cache
def encoding():
    """tiktoken's cl100k_base Encoding, from the first intact copy of its file; MeshError
    (not implemented here) when there is none."""
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        raise MeshError(
            ErrorCode.NOT_IMPLEMENTED,
            f"{ENCODING} token ids need the server's optional tiktoken support "
            "(pip install 'meshserve[tiktoken]'); send text instead of token ids",
        ) from None
    for path in candidate_files():
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == _SHA256:
            ranks = load_tiktoken_bpe(str(path), _SHA256)
            return tiktoken.Encoding(ENCODING, pat_str=_PATTERN, mergeable_ranks=ranks, special_tokens=_SPECIAL)
    raise MeshError(
        ErrorCode.NOT_IMPLEMENTED,
        f"tiktoken's {ENCODING} file is not on this server (set TIKTOKEN_CACHE_DIR to a folder holding it); "
        "send text instead of token ids",
    )


def decode(items: list[list[int]], field: str = "input") -> list[str]:
    """Each cl100k_base id list as its text (a multi-byte character cut by the client's chunking
    becomes U+FFFD, as tiktoken decodes it). Ids outside the encoding: 400 naming the field."""
    enc = encoding()
    texts = []
    for i, ids in enumerate(items):
        try:
            texts.append(enc.decode_bytes(ids).decode("utf-8", errors="replace"))
        except (KeyError, OverflowError, ValueError):
            where = f"`{field}[{i}]`" if len(items) > 1 else f"`{field}`"
            raise invalid(f"{where} holds ids that are not {ENCODING} tokens", param=field) from None
    return texts
