"""Masked-LM and extractive-QA models as users save them: random-init small models.

- test/bert-mlm: BertForMaskedLM, BERT's WordPiece ([MASK]).
- test/roberta-mlm: RobertaForMaskedLM, a byte-level BPE (<mask>), no token_type_ids.
- test/bert-qa: BertForQuestionAnswering with 128 positions, so a long context needs several windows.
- test/distilbert-qa: DistilBertForQuestionAnswering (no token_type_ids).

A wide initializer_range spreads the logits: the pipelines' top-k orders are then far from ties
that float noise between two runs of the same model could flip.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.usermodels.factory import byte_bpe, wordpiece

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "initializer_range": 0.5,
}


def bert_mlm(folder: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    wordpiece(folder, model_max_length=128)
    BertForMaskedLM(BertConfig(vocab_size=30522, **SMALL)).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def roberta_mlm(folder: Path) -> None:
    from transformers import RobertaConfig, RobertaForMaskedLM

    tokenizer = byte_bpe(folder, vocab_size=1000, model_max_length=128)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        **{**SMALL, "max_position_embeddings": 130},  # RoBERTa's positions start after the pad id
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
    )
    RobertaForMaskedLM(config).eval().save_pretrained(str(folder))


def bert_qa(folder: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    wordpiece(folder, model_max_length=128)
    BertForQuestionAnswering(BertConfig(vocab_size=30522, **SMALL)).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def distilbert_qa(folder: Path) -> None:
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForQuestionAnswering

    wordpiece(folder, model_max_length=128)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "DistilBertTokenizer"
    config["model_input_names"] = ["input_ids", "attention_mask"]
    config_path.write_text(json.dumps(config, indent=2))
    model_config = DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128,
        initializer_range=0.5,
    )  # fmt: skip
    DistilBertForQuestionAnswering(model_config).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


FOLDERS = {
    "test/bert-mlm": bert_mlm,
    "test/roberta-mlm": roberta_mlm,
    "test/bert-qa": bert_qa,
    "test/distilbert-qa": distilbert_qa,
}
