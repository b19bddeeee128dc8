"""Model folders as users bring them, for bench/run_user_models.py: random-init weights at a real
model's size, BERT's uncased WordPiece tokenizer (tests/usermodels/factory.py), saved by the
libraries users save with. Built once per machine (factory.built: a digest of this module's source),
so editing the benchmark does not rebuild them; throughput does not depend on trained weights.

  embedder    BGE-small's shape (bge-small-en-v1.5): BERT, 12 layers, hidden 384, 12 heads,
              intermediate 1536, 512 positions; CLS pooling + Normalize, saved by sentence-transformers.
  classifier  BertForSequenceClassification, 6 layers, hidden 384 (MiniLM-L6's shape), 3 labels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

LABELS = ("negative", "neutral", "positive")


def _bert_config(layers: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        **extra,
    )


def embedder(folder: Path) -> None:
    """A BGE-style sentence-transformers folder: modules.json = Transformer, Pooling(cls), Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertModel

    from tests.usermodels.factory import wordpiece

    with tempfile.TemporaryDirectory(prefix="bench-encoder-") as encoder:
        BertModel(_bert_config(12)).save_pretrained(encoder)
        wordpiece(Path(encoder))
        modules = [Transformer(encoder, max_seq_length=512), Pooling(384, pooling_mode="cls"), Normalize()]
        SentenceTransformer(modules=modules, device="cpu").save(str(folder))


def classifier(folder: Path) -> None:
    """A 3-label BertForSequenceClassification folder, saved with save_pretrained + its tokenizer."""
    from transformers import BertForSequenceClassification

    from tests.usermodels.factory import wordpiece

    config = _bert_config(
        6, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={v: k for k, v in enumerate(LABELS)}
    )
    BertForSequenceClassification(config).save_pretrained(str(folder))
    wordpiece(folder)
