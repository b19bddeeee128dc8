"""sentence-transformers folders (modules.json, Pooling, Dense, Normalize, prompts) over small
random-init encoders, saved with sentence_transformers itself, as users' embedders are."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from services.common.sentence_config import LEGACY_MODES
from tests.usermodels.factory import byte_bpe, wordpiece

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
PROMPTS = {"query": "query: ", "document": "passage: "}


def _bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    wordpiece(folder)
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **SMALL)).save_pretrained(str(folder))


def _roberta(folder: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    tokenizer = byte_bpe(folder)
    config = RobertaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, **SMALL
    )
    RobertaModel(config).save_pretrained(str(folder))


def _qwen2(folder: Path) -> None:
    """A decoder with an EOS appended by the tokenizer's post-processor, as Qwen3-Embedding's is:
    last-token pooling then reads the EOS position."""
    from tokenizers import processors
    from transformers import Qwen2Config, Qwen2Model

    tokenizer = byte_bpe(folder, encoder=False)
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", eos)]
    )
    tokenizer.save_pretrained(str(folder))
    config = Qwen2Config(
        vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, **SMALL,
    )  # fmt: skip
    Qwen2Model(config).save_pretrained(str(folder))


def _sentence(encoder: Callable[[Path], None], mode: str, *, dense: int = 0, normalize: bool = True, **kw):
    """A builder: the encoder saved by `encoder`, then Pooling(mode), an optional Dense(32 -> dense,
    tanh) and an optional Normalize, saved as one SentenceTransformer folder."""

    def build(folder: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer, models

        staging = folder / "_encoder"
        encoder(staging)
        transformer = models.Transformer(str(staging))
        modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)]
        if dense:
            modules.append(models.Dense(SMALL["hidden_size"], dense, activation_function=torch.nn.Tanh()))
        if normalize:
            modules.append(models.Normalize())
        SentenceTransformer(modules=modules, **kw).save(str(folder))
        shutil.rmtree(staging)
        _legacy_pooling(folder / "1_Pooling" / "config.json")

    return build


def _legacy_pooling(path: Path) -> None:
    """The Pooling config as the Hub's folders write it (sentence-transformers < 5:
    word_embedding_dimension and one pooling_mode_* flag per mode); sentence-transformers loads both."""
    import json

    config = json.loads(path.read_text())
    modes = config.pop("pooling_mode")
    modes = [modes] if isinstance(modes, str) else list(modes)
    legacy = {"word_embedding_dimension": config.pop("embedding_dimension")}
    for key, mode in LEGACY_MODES.items():
        legacy[key] = mode in modes
    path.write_text(json.dumps({**legacy, **config}, indent=2))


FOLDERS: dict[str, Callable[[Path], None]] = {
    "test/bert-mean": _sentence(_bert, "mean", prompts=PROMPTS, default_prompt_name=None),
    "test/bge-cls": _sentence(_bert, "cls"),
    "test/qwen2-lasttoken": _sentence(_qwen2, "lasttoken", prompts={"query": "Instruct: find it\nQuery: "}),
    "test/roberta-max-dense": _sentence(_roberta, "max", dense=16, normalize=False),
}
