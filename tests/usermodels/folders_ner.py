"""Token-classification folders: a BERT NER model (WordPiece, so words split into ## subwords) and a
RoBERTa one (byte-level BPE with a prefix space), random-init and small, labels in BIO tags."""

from __future__ import annotations

from pathlib import Path

from tests.usermodels.factory import Builder, byte_bpe, wordpiece

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _decisive(model) -> None:
    """A random head with large weights: labels vary between tokens and each token's best label
    wins by a clear margin (no argmax that float noise could flip)."""
    import torch

    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 2.0)
        model.classifier.bias.zero_()


def bert_ner(folder: Path) -> None:
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=30522,
        max_position_embeddings=512,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        **SMALL,
    )
    model = BertForTokenClassification(config)
    _decisive(model)
    model.save_pretrained(str(folder))
    wordpiece(folder)


def roberta_ner(folder: Path) -> None:
    from transformers import RobertaConfig, RobertaForTokenClassification

    tokenizer = byte_bpe(folder, encoder=True)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=514,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        **SMALL,
    )
    model = RobertaForTokenClassification(config)
    _decisive(model)
    model.save_pretrained(str(folder))


FOLDERS: dict[str, Builder] = {"test/bert-ner": bert_ner, "test/roberta-ner": roberta_ner}
