"""Builds `meshserve/tiny-llama-chat`: a few-million-parameter Llama trained on Python's docstrings.

The text is on every machine: the documentation strings (`inspect.getdoc`) of the modules,
classes, functions and methods of a fixed, sorted list of pure-Python standard-library modules
(and their submodules), deduplicated, with code examples dropped and whitespace normalized. The
same docstrings also become short pseudo-dialogues in the chat format ("<|user|>What does
json.dumps do?<|end|><|assistant|>{its first paragraph}<|end|>"), so the chat template is learnt.

A byte-level BPE tokenizer is trained on that text with `tokenizers`, then a
`transformers.LlamaForCausalLM` (tied embeddings, grouped-query attention) is trained from scratch
with AdamW, warm-up and cosine decay, for a fixed number of steps over a fixed data order, with
fixed seeds and two torch threads, so the build is deterministic on a given machine. The corpus
depends on the Python version (its docstrings), which the card records. The folder is in
Hugging Face format: config, safetensors weights, generation config (stops at `<|end|>` and
`</s>`), tokenizer with a Jinja chat template, plus the loss curve (`loss.png`, `losses.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import pkgutil
import platform
import random
import re
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this file also runs alone, standard library only, to extract the corpus
    from services.common.catalog import ModelEntry

SEED = 0
THREADS = 2
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)  # ids 0..6 in this order

# One line per turn marker, no newlines: exactly the text the dialogues are trained on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] | trim + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Top-level pure-Python standard-library modules and packages, sorted. Left out: modules with side
# effects on import (antigravity, this, rlcompleter), GUIs (idlelib, tkinter, turtle, turtledemo),
# tests, data and codec tables (pydoc_data, encodings, lib2to3), installers (ensurepip, venv), and
# the modules deprecated for removal in 3.13 (PEP 594). A name missing on this Python is skipped.
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "bz2", "cProfile", "calendar", "cmd",
    "code", "codeop", "collections", "colorsys", "compileall", "concurrent", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime",
    "dbm", "decimal", "difflib", "dis", "doctest", "email", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "getpass", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib",
    "inspect", "ipaddress", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox",
    "mimetypes", "modulefinder", "multiprocessing", "netrc", "numbers", "opcode", "operator",
    "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "tomllib", "trace",
    "traceback", "tracemalloc", "tty", "types", "typing", "unittest", "urllib", "uuid", "warnings",
    "wave", "weakref", "webbrowser", "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zoneinfo",
)  # fmt: skip
SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test", "_test"})

QUESTIONS = (
    "What does {name} do?",
    "Explain {name}.",
    "What is {name} for?",
    "Tell me about {name}.",
    "How do I use {name}?",
    "Can you describe {name}?",
)
MODULE_QUESTIONS = (
    "What is the {name} module?",
    "What does the {name} module do?",
    "Tell me about the {name} module.",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant that explains Python.",
    "Answer briefly.",
)
PROMPTS = (  # sampled into the card: (kind, prompt)
    ("text", "The function returns"),
    ("chat", "What does json.dumps do?"),
    ("chat", "Tell me about the socket module."),
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Architecture and training schedule. SPEC is what `meshserve models build` uses."""

    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 688
    max_positions: int = 512
    seq_len: int = 128
    batch: int = 16
    steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 25
    weight_decay: float = 0.1
    chat_fraction: float = 0.3  # of the training tokens, roughly
    sample_tokens: int = 48


SPEC = Spec()


@dataclasses.dataclass
class Corpus:
    documents: list[str]  # prose, one docstring each
    dialogues: list[list[dict]]  # chat messages per dialogue
    modules: list[str]  # the modules the text comes from

    @property
    def characters(self) -> int:
        return sum(map(len, self.documents)) + sum(len(m["content"]) for d in self.dialogues for m in d)


def inputs() -> list[Path]:
    """The builder, and the standard-library sources whose docstrings make the corpus (they change
    with the Python version). Found without importing anything."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [Path(__file__)]
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin).resolve()
        if stdlib not in origin.parents:
            continue
        if spec.submodule_search_locations:
            files += sorted(p for p in origin.parent.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(stdlib).parts))
        else:
            files.append(origin)
    return files


# ---- corpus ---------------------------------------------------------------------------------


def _module_names() -> list[str]:
    """Every module to read: the listed ones and their submodules, sorted, pure Python from the
    standard library only (a name that fails to import is skipped)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    names: list[str] = []
    for top in MODULES:
        module = _import(top)
        if module is None or not getattr(module, "__file__", None):
            continue
        if stdlib not in Path(module.__file__).resolve().parents:
            continue  # e.g. a package shadowing a stdlib name
        names.append(top)
        if hasattr(module, "__path__"):
            names += _submodules(module)
    return [n for n in names if _is_python(n)]


def _submodules(package) -> list[str]:
    """A package's importable submodules, depth first in sorted order, never entering tests."""
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__, package.__name__ + "."), key=lambda m: m.name):
        if SKIP_PARTS & set(info.name.split(".")):
            continue
        module = _import(info.name)
        if module is None:
            continue
        names.append(info.name)
        if info.ispkg and hasattr(module, "__path__"):
            names += _submodules(module)
    return names


def _import(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            return None


def _is_python(name: str) -> bool:
    file = getattr(sys.modules.get(name), "__file__", None) or ""
    return file.endswith(".py")


_CODE = re.compile(r"^(>>>|\.\.\.|\$ |%|\s{2,}\S)")


def _prose(doc: str | None) -> list[str]:
    """A docstring's paragraphs, lines joined, whitespace collapsed, code examples dropped."""
    if not doc:
        return []
    paragraphs = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        lines = block.splitlines()
        if any(_CODE.match(line) for line in lines):
            continue
        text = " ".join(" ".join(lines).split())
        if len(text) >= 20 and sum(c.isalpha() for c in text) > 0.6 * len(text):
            paragraphs.append(text)
    return paragraphs


def _members(module) -> list[tuple[str, object]]:
    """(qualified name, object) of a module's own public classes, functions and methods, sorted."""
    out = []
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            out.append((f"{module.__name__}.{name}", obj))
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                function = getattr(member, "__func__", getattr(member, "fget", member))
                if attr.startswith("_") or not (
                    inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod))
                ):
                    continue
                if getattr(function, "__module__", module.__name__) != module.__name__:
                    continue  # patched in by someone else
                out.append((f"{module.__name__}.{name}.{attr}", getattr(member, "__func__", member)))
        elif inspect.isfunction(obj):
            out.append((f"{module.__name__}.{name}", obj))
    return out


def corpus() -> Corpus:
    """The deterministic training text of this Python: docstrings and their dialogues. Extracted
    in a fresh interpreter that sees the standard library only (`python -I -S` on this file), so
    what the calling process imported or patched (transformers adds `Logger.warning_advice`,
    other libraries wrap stdlib functions) cannot change it."""
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve())],
        capture_output=True,
        check=True,
        timeout=600,
    )
    return Corpus(**json.loads(result.stdout))


def _extract() -> dict:
    seen: set[str] = set()
    documents: list[str] = []
    dialogues: list[list[dict]] = []
    modules = _module_names()
    for module_name in modules:
        module = sys.modules[module_name]
        items = [(module_name, module), *_members(module)]
        for name, obj in items:
            try:
                doc = inspect.getdoc(obj)
            except Exception:
                continue
            paragraphs = _prose(doc)
            if not paragraphs:
                continue
            text = "\n".join(paragraphs)
            key = hashlib.sha1(text.encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            documents.append(text)
            dialogues.append(_dialogue(name, obj is module, paragraphs[0], len(dialogues)))
    return {"documents": documents, "dialogues": dialogues, "modules": modules}


def _dialogue(name: str, is_module: bool, answer: str, index: int) -> list[dict]:
    questions = MODULE_QUESTIONS if is_module else QUESTIONS
    digest = int(hashlib.sha1(f"{index}:{name}".encode()).hexdigest(), 16)
    messages = []
    if digest % 4 == 0:
        messages.append({"role": "system", "content": SYSTEM_PROMPTS[digest // 4 % len(SYSTEM_PROMPTS)]})
    messages.append({"role": "user", "content": questions[digest // 16 % len(questions)].format(name=name)})
    messages.append({"role": "assistant", "content": answer[:600]})
    return messages


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in Python (the dialogues are trained on exactly this text)."""
    text = BOS + "".join(f"<|{m['role']}|>{m['content'].strip()}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


# ---- tokenizer ------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over the texts; the special tokens take ids 0..6. Encoding prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def token_stream(corpus: Corpus, tokenizer, spec: Spec) -> tuple[list[int], float]:
    """All training text as one token stream in a fixed order: prose documents (<s> text </s>)
    and rendered dialogues, shuffled together with a fixed seed, the dialogues repeated to make
    up about `spec.chat_fraction` of the tokens. Returns (tokens, the dialogues' share of them)."""
    eos = tokenizer.token_to_id(EOS)
    prose = [[*e.ids, eos] for e in tokenizer.encode_batch(corpus.documents)]
    chats = [
        [*e.ids, eos]
        for e in tokenizer.encode_batch([render_chat(d) for d in corpus.dialogues], add_special_tokens=False)
    ]
    prose_tokens, chat_tokens = sum(map(len, prose)), max(1, sum(map(len, chats)))
    repeats = (
        max(1, round(spec.chat_fraction / (1 - spec.chat_fraction) * prose_tokens / chat_tokens))
        if spec.chat_fraction > 0
        else 0
    )
    pieces = prose + chats * repeats
    random.Random(SEED).shuffle(pieces)
    return [t for piece in pieces for t in piece], chat_tokens * repeats / max(1, prose_tokens + chat_tokens * repeats)


# ---- model ----------------------------------------------------------------------------------


def model_config(spec: Spec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_dropout=0.0,
    )


def _bf16() -> bool:
    """bf16 autocast when the CPU has native bf16 (about 2x faster here); numerics are then
    per-machine, which the build already is (fp32 weights either way)."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def train(spec: Spec, tokenizer, stream: list[int], progress=None):
    """Train a fresh LlamaForCausalLM on `stream`; returns (model, losses per step, seconds)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM(model_config(spec, tokenizer))
    data = torch.tensor(stream, dtype=torch.long)
    rows = len(data) // spec.seq_len
    if rows < 1:
        raise ValueError(f"corpus too small: {len(data)} tokens for sequences of {spec.seq_len}")
    data = data[: rows * spec.seq_len].view(rows, spec.seq_len)
    generator = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    bf16 = _bf16()
    bar = progress(total=spec.steps, desc="train tinylm", unit="step") if progress else None
    order = torch.randperm(rows, generator=generator)
    cursor, losses = 0, []
    model.train()
    start = time.perf_counter()
    for _ in range(spec.steps):
        if cursor + spec.batch > rows:  # next epoch over the rows, in a new fixed order
            order, cursor = torch.randperm(rows, generator=generator), 0
        batch = data[order[cursor : cursor + min(spec.batch, rows)]]
        cursor += spec.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
        if bar:
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    if bar:
        bar.close()
    model.eval()
    return model, losses, seconds


# ---- saving, sampling, card -----------------------------------------------------------------


def save(out: Path, model, tokenizer, spec: Spec) -> None:
    """The Hugging Face folder: weights, config, generation config and the tokenizer files."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[END], ids[EOS]],
        pad_token_id=ids[PAD],
        max_length=spec.max_positions,
        do_sample=False,
    ).save_pretrained(str(out))
    tokenizer.save(str(out / "tokenizer.json"))
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_positions,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def samples(out: Path, max_new_tokens: int) -> list[dict]:
    """Greedy and sampled (seed SEED + prompt index) completions of PROMPTS, from the saved folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    results = []
    for index, (kind, prompt) in enumerate(PROMPTS):
        if kind == "chat":
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([ids])
        row = {"kind": kind, "prompt": prompt, "seed": SEED + index}
        for mode, kwargs in (
            ("greedy", {"do_sample": False}),
            ("sampled", {"do_sample": True, "temperature": 0.8, "top_k": 40}),
        ):
            torch.manual_seed(SEED + index)
            with torch.inference_mode():
                generated = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **kwargs
                )
            row[mode] = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip()
        results.append(row)
    return results


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same losses, the same bytes
    plt.close(fig)


def make(out: Path, spec: Spec, text: Corpus, progress=None) -> dict:
    """Tokenizer, training, the saved folder, loss curve and samples; returns the metrics."""
    started = time.perf_counter()
    tokenizer = train_tokenizer(text.documents + [render_chat(d) for d in text.dialogues], spec.vocab_size)
    stream, chat_share = token_stream(text, tokenizer, spec)
    model, losses, seconds = train(spec, tokenizer, stream, progress)
    save(out, model, tokenizer, spec)
    (out / "losses.json").write_text(json.dumps(losses) + "\n")
    plot_losses(losses, out / "loss.png", f"tinylm: {spec.steps} steps of {spec.batch}x{spec.seq_len} tokens")
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    tail = losses[-max(1, len(losses) // 20) :]
    return {
        "python": sys.version.split()[0],
        "python_full": sys.version,
        "modules": len(text.modules),
        "documents": len(text.documents),
        "dialogues": len(text.dialogues),
        "characters": text.characters,
        "stream_tokens": len(stream),
        "chat_share": round(chat_share, 3),
        "trained_tokens": spec.steps * spec.batch * spec.seq_len,
        "vocab_size": tokenizer.get_vocab_size(),
        "special_token_ids": ids,
        "parameters": sum(p.numel() for p in model.parameters()),
        "spec": dataclasses.asdict(spec),
        "bf16_autocast": _bf16(),
        "threads": THREADS,
        "steps": spec.steps,
        "train_seconds": round(seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
        "first_loss": losses[0],
        "final_loss": round(sum(tail) / len(tail), 4),
        "hardware": f"{platform.machine()} {_cpu_name()}, {THREADS} torch threads",
        "samples": samples(out, spec.sample_tokens),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def build(entry: ModelEntry, out: Path, base: Path | None = None, progress=None) -> dict:
    spec = (
        dataclasses.replace(SPEC, max_positions=entry.preprocess.max_length)
        if entry.preprocess.max_length != SPEC.max_positions
        else SPEC
    )
    started = time.perf_counter()
    text = corpus()
    corpus_seconds = time.perf_counter() - started
    metrics = make(out, spec, text, progress)
    metrics["corpus_seconds"] = round(corpus_seconds, 1)
    metrics["build_seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def card(entry: ModelEntry, metrics: dict) -> str:
    spec = metrics["spec"]
    ids = metrics["special_token_ids"]
    samples_md = "\n".join(
        f"  - {s['kind']} prompt `{s['prompt']}`\n    - greedy: {s['greedy']!r}\n"
        f"    - sampled (T=0.8, top-k 40, seed {s['seed']}): {s['sampled']!r}"
        for s in metrics["samples"]
    )
    return f"""# {entry.id}

{entry.description.strip()}

- **Task**: text-generation and chat. A `LlamaForCausalLM` trained from scratch by
  `meshserve models build`; Hugging Face format (`model/`), loads with `AutoModelForCausalLM` and
  `AutoTokenizer`.
- **Data**: the documentation strings (`inspect.getdoc`) of {metrics["modules"]} pure-Python standard-library
  modules of Python {metrics["python"]} (`{metrics["python_full"]}`) and of their public classes, functions
  and methods: {metrics["documents"]} deduplicated docstrings with code examples dropped, plus
  {metrics["dialogues"]} pseudo-dialogues ("What does json.dumps do?" → the docstring's first paragraph);
  {metrics["characters"]:,} characters, {metrics["stream_tokens"]:,} tokens ({metrics["chat_share"]:.0%} of them
  dialogues). Another Python version gives another corpus.
- **Tokenizer**: byte-level BPE trained on that text, vocabulary {metrics["vocab_size"]}; special tokens
  `<s>`={ids[BOS]}, `</s>`={ids[EOS]}, `<pad>`={ids[PAD]}, `<|system|>`={ids[SYSTEM]}, `<|user|>`={ids[USER]},
  `<|assistant|>`={ids[ASSISTANT]}, `<|end|>`={ids[END]}; encoding prepends `<s>`. Chat template (Jinja, in
  `tokenizer_config.json`): `<s><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>`, with
  `add_generation_prompt` appending `<|assistant|>`. Generation stops at `<|end|>` or `</s>`.
- **Architecture**: Llama, hidden {spec["hidden_size"]}, {spec["layers"]} layers, {spec["heads"]} heads
  ({spec["kv_heads"]} key/value heads), MLP {spec["intermediate_size"]}, context {spec["max_positions"]} tokens,
  tied embeddings: **{metrics["parameters"]:,} parameters**.
- **Training**: {metrics["steps"]} steps of {spec["batch"]} x {spec["seq_len"]} tokens
  ({metrics["trained_tokens"]:,} tokens), AdamW (lr {spec["lr"]:g}, betas 0.9/0.95, weight decay
  {spec["weight_decay"]:g}), {spec["warmup"]} warm-up steps then cosine to {spec["min_lr_ratio"]:g} x lr, gradient
  clipping 1.0, bf16 autocast {"on" if metrics["bf16_autocast"] else "off"}; fixed seeds, data order and
  thread count. Loss {metrics["first_loss"]:.2f} → **{metrics["final_loss"]:.3f}** (mean of the last 5% of
  steps); {metrics["train_seconds"]:.0f} s of training, {metrics["build_seconds"]:.0f} s for the whole build on
  {metrics["hardware"]}. Loss curve: [model/loss.png](model/loss.png) (per step: `model/losses.json`).
- **Samples** ({spec["sample_tokens"]} new tokens at most):
{samples_md}
- **Limits**: a few million parameters trained for minutes: it produces fluent-ish, documentation-
  flavoured English and follows the chat format, but it is not factual, does not follow
  instructions beyond the format, and knows nothing beyond Python docstrings. For serving and
  pipeline tests, not for answers.
"""


if __name__ == "__main__":  # the corpus extraction, run by corpus() as `python -I -S tinylm.py`
    sys.stdout.write(json.dumps(_extract()))
