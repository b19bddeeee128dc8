"""Sequence classifiers and a cross-encoder as users save them: random-init small models.

- test/bert-sst3: BertForSequenceClassification, 3 labels with names (softmax).
- test/roberta-multilabel: RobertaForSequenceClassification, problem_type multi_label_classification
  (sigmoid per label), a byte-level BPE tokenizer.
- test/bert-reranker: a sentence-transformers CrossEncoder (BERT, num_labels 1) saved with
  CrossEncoder.save_pretrained (text-ranking and text-classification).
"""

from __future__ import annotations

from pathlib import Path

from tests.usermodels.factory import byte_bpe, wordpiece

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "initializer_range": 0.5,  # wider than BERT's 0.02: scores that differ between inputs
}


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, **SMALL, **extra)


def bert_sst3(folder: Path) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    wordpiece(folder, model_max_length=128)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = _bert_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(config).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def roberta_multilabel(folder: Path) -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = byte_bpe(folder, vocab_size=1000, model_max_length=128)
    labels = {0: "sports", 1: "politics", 2: "science", 3: "art"}
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        **{**SMALL, "max_position_embeddings": 130},  # RoBERTa's positions start after the pad id
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
        num_labels=4,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        problem_type="multi_label_classification",
    )
    RobertaForSequenceClassification(config).eval().save_pretrained(str(folder))


def bert_reranker(folder: Path) -> None:
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    base = folder / "base"
    wordpiece(base, model_max_length=128)
    BertForSequenceClassification(_bert_config(num_labels=1)).save_pretrained(str(base))
    model = CrossEncoder(str(base), num_labels=1, max_length=128, device="cpu")
    model.save_pretrained(str(folder))
    import shutil

    shutil.rmtree(base)


FOLDERS = {
    "test/bert-sst3": bert_sst3,
    "test/roberta-multilabel": roberta_multilabel,
    "test/bert-reranker": bert_reranker,
}
