"""Builds `meshserve/sentiment-minilm`: all-MiniLM-L6-v2 fine-tuned with a linear sentiment head.

The labelled sentences ship with the repository (services/models/data/sentiment.tsv, written for
this project, each marked train or test). The model is the served architecture exactly: the
encoder, attention-masked mean pooling, L2 normalization and a 2-way linear head
(`classifier.safetensors`). The whole encoder is fine-tuned with cross-entropy (a frozen encoder
with a logistic regression on top reached only ~0.80 held-out accuracy: MiniLM's similarity
embeddings barely separate sentiment). Seeds, batch order and thread count are fixed, so the
build is deterministic on a given machine.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from services.common.catalog import ModelEntry

MODELS = Path(__file__).resolve().parents[1]
DATA = MODELS / "data" / "sentiment.tsv"
EPOCHS = 4
BATCH = 16
ENCODER_LR = 4e-5
HEAD_LR = 1e-2
SEED = 0


def load(split: str | None = None) -> list[tuple[str, str]]:
    """(text, label) pairs of the shipped set, optionally one split ("train" or "test")."""
    with DATA.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text"], r["label"].upper()) for r in rows if split is None or r["split"] == split]


def inputs() -> list[Path]:
    return [Path(__file__), DATA, MODELS.parent / "common" / "nets.py"]


def build(entry: ModelEntry, out: Path, base: Path | None = None, progress=None) -> dict:
    import torch

    if base is None:
        raise ValueError(f"{entry.id}: the sentiment model needs a base encoder (source.base)")
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    labels = list(entry.postprocess.labels)
    train, test = load("train"), load("test")
    model = SentimentClassifier.from_base(base, labels, max_length=entry.preprocess.max_length)
    bar = progress(total=_steps(train), desc=f"train {entry.id}", unit="step") if progress else None
    losses = model.fine_tune(train, on_step=bar.update if bar else None)
    if bar:
        bar.close()
    metrics = {
        "train_examples": len(train),
        "test_examples": len(test),
        "epochs": EPOCHS,
        "final_train_loss": round(float(np.mean(losses[-(len(train) // BATCH) :])), 4),
        "train_accuracy": round(model.accuracy(train), 4),
        "test_accuracy": round(model.accuracy(test), 4),
    }
    model.save(base, out)
    return metrics


def _steps(train: list) -> int:
    return EPOCHS * -(-len(train) // BATCH)


class SentimentClassifier:
    """The served architecture: encoder, attention-masked mean pooling, L2 normalization, linear head."""

    def __init__(self, tokenizer, encoder, head, labels: list[str]) -> None:
        self.tokenizer, self.encoder, self.head, self.labels = tokenizer, encoder, head, labels

    @classmethod
    def from_base(cls, base: Path, labels: list[str], *, max_length: int) -> SentimentClassifier:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        encoder = AutoModel.from_pretrained(str(base))
        return cls(tokenizer, encoder, torch.nn.Linear(encoder.config.hidden_size, len(labels)), labels)

    def logits(self, texts: list[str]):
        import torch

        from services.common.nets import mean_pool

        encoded = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(torch.nn.functional.normalize(mean_pool(hidden, mask), dim=1))

    def accuracy(self, pairs: list[tuple[str, str]]) -> float:
        import torch

        self.encoder.eval()
        with torch.inference_mode():
            predicted = torch.cat(
                [self.logits([t for t, _ in pairs[i : i + 64]]).argmax(1) for i in range(0, len(pairs), 64)]
            )
        return float((predicted.numpy() == np.array([self.labels.index(y) for _, y in pairs])).mean())

    def fine_tune(self, train: list[tuple[str, str]], on_step=None) -> list[float]:
        """Cross-entropy over the whole network with AdamW; returns the loss of every step."""
        import torch

        optimizer = torch.optim.AdamW(
            [
                {"params": self.encoder.parameters(), "lr": ENCODER_LR},
                {"params": self.head.parameters(), "lr": HEAD_LR},
            ],
            weight_decay=0.01,
        )
        steps = _steps(train)
        # Linear warm-up over 10 steps, then linear decay to zero.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps)
        )
        targets = torch.tensor([self.labels.index(y) for _, y in train])
        generator = torch.Generator().manual_seed(SEED)
        losses = []
        for _ in range(EPOCHS):
            self.encoder.train()
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), BATCH):
                idx = order[start : start + BATCH]
                loss = torch.nn.functional.cross_entropy(self.logits([train[i][0] for i in idx]), targets[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if on_step:
                    on_step()
        return losses

    def save(self, base: Path, out: Path) -> None:
        from safetensors.torch import save_file

        shutil.copytree(base, out, dirs_exist_ok=True)  # tokenizer and sentence-transformers files
        self.encoder.save_pretrained(str(out))
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(out / "classifier.safetensors"))
        head = {"labels": self.labels, "pooling": "mean", "normalize": True}
        (out / "meshserve-head.json").write_text(json.dumps(head) + "\n")


def card(entry: ModelEntry, metrics: dict) -> str:
    return f"""# {entry.id}

{entry.description.strip()}

- **Task**: text-classification, labels {", ".join(entry.postprocess.labels)} (softmax by default).
- **Data**: `services/models/data/sentiment.tsv`, English sentences written for meshserve (17 domains:
  electronics, kitchen, clothing, toys, furniture, restaurants, films, books, music, travel, customer
  service, software, games, daily life, work, cars, fitness; with negation, mixed and mildly sarcastic
  cases), balanced: {metrics["train_examples"]} train / {metrics["test_examples"]} held out.
- **Training**: `{entry.source.base}` fine-tuned end to end with a linear head over its mean-pooled,
  L2-normalized embedding ({entry.preprocess.max_length} tokens), cross-entropy, AdamW (encoder lr
  {ENCODER_LR:g}, head lr {HEAD_LR:g}), {metrics["epochs"]} epochs of batch {BATCH}, warm-up then linear decay;
  final train loss {metrics["final_train_loss"]}.
- **Metrics**: held-out accuracy **{metrics["test_accuracy"]:.4f}**; train accuracy {metrics["train_accuracy"]:.4f}.
  (Frozen encoder + logistic regression, tried first: ~0.80 held-out.)
- **Limits**: English; short review-like text; trained on {metrics["train_examples"]} sentences, so domain
  shift, long documents, irony and neutral statements are unreliable (there is no neutral class).
"""
