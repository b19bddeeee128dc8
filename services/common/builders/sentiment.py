"""Builds `meshserve/sentiment-minilm`: all-MiniLM-L6-v2 fine-tuned with a linear sentiment head.

The labelled sentences ship with the repository (services/common/data/sentiment.tsv, written for
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

DATA = Path(__file__).parent.parent / "data" / "sentiment.tsv"
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
    return [Path(__file__), DATA, Path(__file__).parent.parent / "nets.py"]


def build(entry: ModelEntry, out: Path, base: Path | None = None, progress=None) -> dict:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from services.common.nets import mean_pool

    if base is None:
        raise ValueError(f"{entry.id}: the sentiment model needs a base encoder (source.base)")
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    labels = list(entry.postprocess.labels)
    train, test = load("train"), load("test")
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=entry.preprocess.max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encoder = AutoModel.from_pretrained(str(base))
    head = torch.nn.Linear(encoder.config.hidden_size, len(labels))

    def logits(texts: list[str]) -> torch.Tensor:
        encoded = tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return head(torch.nn.functional.normalize(mean_pool(hidden, mask), dim=1))

    def accuracy(pairs) -> float:
        encoder.eval()
        with torch.inference_mode():
            predicted = torch.cat([logits([t for t, _ in pairs[i : i + 64]]).argmax(1) for i in range(0, len(pairs), 64)])
        return float((predicted.numpy() == np.array([labels.index(y) for _, y in pairs])).mean())

    optimizer = torch.optim.AdamW(
        [{"params": encoder.parameters(), "lr": ENCODER_LR}, {"params": head.parameters(), "lr": HEAD_LR}],
        weight_decay=0.01,
    )
    steps = EPOCHS * -(-len(train) // BATCH)
    # Linear warm-up over 10 steps, then linear decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    targets = torch.tensor([labels.index(y) for _, y in train])
    generator = torch.Generator().manual_seed(SEED)
    bar = progress(total=steps, desc=f"train {entry.id}", unit="step") if progress else None
    losses = []
    for _ in range(EPOCHS):
        encoder.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), BATCH):
            idx = order[start : start + BATCH]
            loss = torch.nn.functional.cross_entropy(logits([train[i][0] for i in idx]), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if bar:
                bar.update()
    if bar:
        bar.close()
    metrics = {
        "train_examples": len(train),
        "test_examples": len(test),
        "epochs": EPOCHS,
        "final_train_loss": round(float(np.mean(losses[-(len(train) // BATCH) :])), 4),
        "train_accuracy": round(accuracy(train), 4),
        "test_accuracy": round(accuracy(test), 4),
    }
    shutil.copytree(base, out, dirs_exist_ok=True)  # tokenizer and sentence-transformers files
    encoder.save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / "classifier.safetensors"))
    (out / "meshserve-head.json").write_text(json.dumps({"labels": labels, "pooling": "mean", "normalize": True}) + "\n")
    return metrics


def card(entry: ModelEntry, metrics: dict) -> str:
    return f"""# {entry.id}

{entry.description.strip()}

- **Task**: text-classification, labels {", ".join(entry.postprocess.labels)} (softmax by default).
- **Data**: `services/common/data/sentiment.tsv`, English sentences written for meshserve (17 domains:
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
