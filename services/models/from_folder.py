"""A catalog entry inferred from a Hugging Face model folder's own files (`meshserve up --model`,
`meshserve models add`): the runtime from config.json's architectures (or a sentence-transformers
modules.json), tensors, labels, limits and prompts from the files that hold them. What cannot be
inferred or served is refused with a FolderError naming the folder, the file and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.catalog import ModelEntry, Source
from services.common.sentence_config import module_kind, pooling_modes

# Architecture class name suffix -> runtime (a sentence-transformers folder is found first).
SUFFIXES = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForMaskedLM": "masked_lm",
    "ForQuestionAnswering": "question_answering",
    "ForImageClassification": "vision_classification",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
}
# Encoders whose position ids start after the padding index (max_position_embeddings = 512 + 2).
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text"})
UNSET_MAX_LENGTH = 1_000_000  # tokenizers without model_max_length say 1e30


class FolderError(ValueError):
    """A folder that cannot be served as it is; the message names the folder, file and field."""


@dataclass
class Inferred:
    """An entry and, per line, what was inferred from which file (the YAML's comment header)."""

    entry: ModelEntry
    notes: list[str] = field(default_factory=list)


@dataclass
class _Folder:
    path: Path
    config: dict
    notes: list[str] = field(default_factory=list)

    def json(self, name: str, *, required: bool = False) -> dict:
        return read_json(self.path, name, required=required)

    def note(self, file: str, what: str) -> None:
        self.notes.append(f"{file}: {what}")


def read_json(folder: Path, name: str, *, required: bool = False) -> dict:
    """A JSON file of the folder ({} when absent and not required); FolderError when invalid."""
    path = folder / name
    if not path.is_file():
        if required:
            raise FolderError(f"{folder}: no {name}; a Hugging Face model folder (save_pretrained) has one")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FolderError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FolderError(f"{path}: expected a JSON object, not {type(data).__name__}")
    return data


def inference_name(model_id: str) -> str:
    """The id as a Triton model name ([A-Za-z0-9][A-Za-z0-9_.-]*): '/' -> '--', others -> '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_id.replace("/", "--")).lstrip("_.-")
    return name or "model"


def entry_from_folder(
    folder: Path, *, model_id: str, task: str | None = None, source: Source | None = None
) -> ModelEntry:
    """The catalog entry that serves `folder` (see infer_folder)."""
    return infer_folder(folder, model_id=model_id, task=task, source=source).entry


def infer_folder(folder: Path, *, model_id: str, task: str | None = None, source: Source | None = None) -> Inferred:
    """Infer the entry of a model folder; `task` picks the default among the tasks it can do."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a folder")
    ctx = _Folder(folder, read_json(folder, "config.json", required=True))
    runtime = _runtime(ctx)
    body = RUNTIMES[runtime](ctx)
    tasks = body.pop("tasks")
    if task is not None:
        if task not in tasks:
            raise FolderError(
                f"{folder}: task {task!r} is not one this {runtime} model can do; choices: {', '.join(tasks)}"
            )
        tasks = [task, *(t for t in tasks if t != task)]
    source = source or Source(kind="path", path=str(folder.resolve()))
    architecture = (ctx.config.get("architectures") or ["sentence-transformers"])[0]
    body["inference"] = {
        "name": inference_name(model_id),
        "runtime": runtime,
        **_batching(runtime),
        **body["inference"],
    }
    data = {"id": model_id, "tasks": tasks, "description": f"{architecture} ({runtime})", "source": source, **body}
    try:
        entry = ModelEntry.model_validate(data)
    except ValueError as exc:
        raise FolderError(f"{folder}: the inferred entry is not valid: {exc}") from None
    return Inferred(entry, ctx.notes)


def _runtime(ctx: _Folder) -> str:
    modules = _modules(ctx)
    if any(module_kind(m) == "Pooling" for m in modules):
        ctx.note("modules.json", "a Pooling module: sentence-transformers embedder (runtime sentence_embedding)")
        return "sentence_embedding"
    architectures = ctx.config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise FolderError(
            f"{ctx.path / 'config.json'}: field 'architectures' is missing; it names the model class "
            f"(save the model with its head, e.g. AutoModelForSequenceClassification.save_pretrained); "
            f"supported: *{', *'.join(SUFFIXES)}, or a sentence-transformers folder (modules.json with Pooling)"
        )
    name = str(architectures[0])
    for suffix, runtime in SUFFIXES.items():
        if name.endswith(suffix):
            ctx.note("config.json", f"architectures {name}: runtime {runtime}")
            return runtime
    raise FolderError(
        f"{ctx.path / 'config.json'}: architectures {name!r} has no runtime; supported: class names ending in "
        f"{', '.join(SUFFIXES)}, or a sentence-transformers folder (modules.json with a Pooling module)"
    )


def _modules(ctx: _Folder) -> list[dict]:
    path = ctx.path / "modules.json"
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FolderError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise FolderError(f"{path}: expected a list of modules ({{idx, name, path, type}})")
    return modules


def _int(ctx: _Folder, name: str, data: dict, key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FolderError(f"{ctx.path / name}: field {key!r} must be a positive integer, not {value!r}")
    return value


# -- text models -----------------------------------------------------------------------------------


def _text_inputs(ctx: _Folder) -> list[dict]:
    """input_ids, attention_mask and token_type_ids when the tokenizer takes them."""
    if not (ctx.path / "tokenizer.json").is_file():
        raise FolderError(
            f"{ctx.path}: no tokenizer.json; a fast tokenizer is needed (save it with "
            f"AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder))"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ctx.path))
    except Exception as exc:  # transformers raises many kinds for a broken tokenizer
        raise FolderError(
            f"{ctx.path / 'tokenizer.json'}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from None
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    ctx.note("tokenizer_config.json", f"inputs {', '.join(names)}")
    return [{"name": n, "datatype": "INT64", "dims": [-1]} for n in names]


def _max_length(ctx: _Folder) -> int:
    """min(tokenizer model_max_length, usable max_position_embeddings)."""
    limits = []
    declared = ctx.json("tokenizer_config.json").get("model_max_length")
    if isinstance(declared, int) and 0 < declared < UNSET_MAX_LENGTH:
        limits.append(declared)
    positions = ctx.config.get("max_position_embeddings", ctx.config.get("n_positions"))
    if isinstance(positions, int) and positions > 0:
        if ctx.config.get("model_type") in OFFSET_POSITIONS:
            positions -= int(ctx.config.get("pad_token_id") or 1) + 1
        limits.append(positions)
    if not limits:
        raise FolderError(
            f"{ctx.path / 'config.json'}: field 'max_position_embeddings' is missing and "
            f"tokenizer_config.json has no 'model_max_length': the token limit cannot be inferred"
        )
    ctx.note("tokenizer_config.json / config.json", f"max_length {min(limits)}")
    return min(limits)


def _labels(ctx: _Folder) -> list[str]:
    id2label = ctx.config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        # transformers leaves both out for its default of 2 labels (LABEL_0, LABEL_1)
        count = _int(ctx, "config.json", {"num_labels": 2, **ctx.config}, "num_labels")
        ctx.note("config.json", f"num_labels {count} (no id2label: LABEL_i)")
        return [f"LABEL_{i}" for i in range(count)]
    try:
        ordered = sorted((int(k), str(v)) for k, v in id2label.items())
    except ValueError:
        raise FolderError(f"{ctx.path / 'config.json'}: field 'id2label' keys must be integers") from None
    if [i for i, _ in ordered] != list(range(len(ordered))):
        raise FolderError(f"{ctx.path / 'config.json'}: field 'id2label' must number labels 0..n-1")
    ctx.note("config.json", f"labels from id2label ({len(ordered)})")
    return [label for _, label in ordered]


def _text(ctx: _Folder, outputs: list[dict], tasks: list[str], *, pre: dict | None = None, **extra) -> dict:
    """A text entry: the tokenizer's inputs, the given outputs, limits."""
    inputs = _text_inputs(ctx)
    preprocess = {"kind": "text", "max_items": 128, **(pre or {})}
    if "max_length" not in preprocess:
        preprocess["max_length"] = _max_length(ctx)
    queue = max(1024, preprocess["max_items"])
    return {
        "tasks": tasks,
        "preprocess": preprocess,
        "inference": {"inputs": inputs, "outputs": outputs, "max_queue_size": queue},
        **extra,
    }


def _sentence_embedding(ctx: _Folder) -> dict:
    modules = _modules(ctx)
    dims = _embedding_dims(ctx, modules)
    normalize = any(module_kind(m) == "Normalize" for m in modules)
    ctx.note("modules.json", f"Normalize module: {'yes' if normalize else 'no'} (postprocess.normalize)")
    st_config = ctx.json("config_sentence_transformers.json")
    pre: dict = {"max_items": 2048}
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise FolderError(f"{ctx.path / 'config_sentence_transformers.json'}: field 'prompts' must map names to text")
    if prompts:
        pre["prompts"] = prompts
        ctx.note("config_sentence_transformers.json", f"prompts {', '.join(prompts)}")
    default = st_config.get("default_prompt_name")
    if default:
        if default not in prompts:
            raise FolderError(
                f"{ctx.path / 'config_sentence_transformers.json'}: field 'default_prompt_name' {default!r} "
                f"is not one of the prompts ({', '.join(prompts) or 'none'})"
            )
        pre["default_prompt_name"] = default
    seq = ctx.json("sentence_bert_config.json").get("max_seq_length")
    if isinstance(seq, int) and seq > 0:
        pre["max_length"] = seq
        ctx.note("sentence_bert_config.json", f"max_length {seq} (max_seq_length)")
    outputs = [{"name": "embedding", "datatype": "FP32", "dims": [dims]}]
    return _text(
        ctx, outputs, ["feature-extraction", "sentence-similarity"], pre=pre, postprocess={"normalize": normalize}
    )


def _embedding_dims(ctx: _Folder, modules: list[dict]) -> int:
    """The size after the last Dense module, else the pooled size (word dims x pooling modes)."""
    dims = None
    for module in modules:
        folder = str(module.get("path", ""))
        if module_kind(module) == "Pooling":
            name = f"{folder}/config.json" if folder else "config.json"
            pooling = read_json(ctx.path, name, required=True)
            try:
                modes = pooling_modes(pooling)  # what the runtime would refuse is refused here
            except ValueError as exc:
                raise FolderError(f"{ctx.path}: {name}: {exc}") from None
            key = "embedding_dimension" if "embedding_dimension" in pooling else "word_embedding_dimension"
            dims = _int(ctx, name, pooling, key) * len(modes)
            ctx.note(name, f"pooling {', '.join(modes)}")
        elif module_kind(module) == "Dense":
            name = f"{folder}/config.json"
            dims = _int(ctx, name, read_json(ctx.path, name, required=True), "out_features")
            ctx.note(name, f"Dense to {dims} dimensions")
    if dims is None:
        dims = _int(ctx, "config.json", ctx.config, "hidden_size")
    return dims


def _activation(ctx: _Folder, labels: list[str]) -> str:
    """The pipeline's default function_to_apply (or a CrossEncoder's activation_fn)."""
    st_config = ctx.json("config_sentence_transformers.json")
    problem = ctx.config.get("problem_type")
    if st_config.get("model_type") == "CrossEncoder" and str(st_config.get("activation_fn", "")).endswith("Identity"):
        activation = "none"
    elif problem == "regression":
        activation = "none"
    elif problem == "multi_label_classification" or len(labels) == 1:
        activation = "sigmoid"
    else:
        activation = "softmax"
    ctx.note("config.json", f"activation {activation} (problem_type {problem}, {len(labels)} label(s))")
    return activation


def _sequence_classification(ctx: _Folder) -> dict:
    labels = _labels(ctx)
    tasks = ["text-ranking", "text-classification"] if len(labels) == 1 else ["text-classification"]
    outputs = [{"name": "logits", "datatype": "FP32", "dims": [len(labels)]}]
    post = {"labels": labels, "activation": _activation(ctx, labels)}
    return _text(ctx, outputs, tasks, postprocess=post)


def _token_classification(ctx: _Folder) -> dict:
    labels = _labels(ctx)
    outputs = [{"name": "logits", "datatype": "FP32", "dims": [-1, len(labels)]}]
    return _text(ctx, outputs, ["token-classification"], postprocess={"labels": labels})


def _masked_lm(ctx: _Folder) -> dict:
    vocab = _int(ctx, "config.json", ctx.config, "vocab_size")
    outputs = [{"name": "mask_logits", "datatype": "FP32", "dims": [-1, vocab]}]
    return _text(ctx, outputs, ["fill-mask"])


def _question_answering(ctx: _Folder) -> dict:
    outputs = [{"name": n, "datatype": "FP32", "dims": [-1]} for n in ("start_logits", "end_logits")]
    return _text(ctx, outputs, ["question-answering"])


def _vision_classification(ctx: _Folder) -> dict:
    name = "preprocessor_config.json"
    if not (ctx.path / name).is_file():
        raise FolderError(f"{ctx.path}: no {name}; an image model needs its image processor's settings")
    processor = ctx.json(name)
    crop = bool(processor.get("do_center_crop"))
    key = "crop_size" if crop else "size"
    height, width = _image_size(ctx, processor, key)
    channels = ctx.config.get("num_channels", processor.get("num_channels", 3))
    ctx.note(name, f"pixel_values [{channels}, {height}, {width}] from {key}")
    labels = _labels(ctx)
    return {
        "tasks": ["image-classification"],
        "preprocess": {"kind": "image", "max_items": 64},
        "inference": {
            "inputs": [{"name": "pixel_values", "datatype": "FP32", "dims": [channels, height, width]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "dims": [len(labels)]}],
            "max_queue_size": 1024,
        },
        "postprocess": {"labels": labels, "activation": _activation(ctx, labels), "top_k": 5},
    }


def _image_size(ctx: _Folder, processor: dict, key: str) -> tuple[int, int]:
    size = processor.get(key)
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, dict):
        if isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
            return size["height"], size["width"]
        if isinstance(size.get("shortest_edge"), int):
            return size["shortest_edge"], size["shortest_edge"]
    raise FolderError(
        f"{ctx.path / 'preprocessor_config.json'}: field {key!r} must be an int, {{height, width}} or "
        f"{{shortest_edge}} so that the pixel tensor has a fixed size, not {size!r}"
    )


def _causal_lm(ctx: _Folder) -> dict:
    if not (ctx.path / "tokenizer.json").is_file():
        raise FolderError(f"{ctx.path}: no tokenizer.json; a fast tokenizer is needed")
    generation = ctx.json("generation_config.json")
    eos = generation.get("eos_token_id", ctx.config.get("eos_token_id"))
    if eos is None:
        raise FolderError(
            f"{ctx.path / 'generation_config.json'}: field 'eos_token_id' is missing (nor in config.json): "
            f"generation would never stop"
        )
    ctx.note("generation_config.json", f"eos_token_id {eos}")
    template = "chat_template" in ctx.json("tokenizer_config.json") or (ctx.path / "chat_template.jinja").is_file()
    ctx.note("tokenizer_config.json", "chat template: " + ("yes" if template else "none (completions only, no chat)"))
    context = _max_length(ctx)
    new_tokens = min(256, context // 4)
    return {
        "tasks": ["text-generation"],
        "preprocess": {
            "kind": "text",
            "max_length": context,
            "max_input_tokens": context - context // 8,
            "max_total_tokens": context,
            "default_max_new_tokens": new_tokens,
        },
        "inference": {
            "inputs": [{"name": "input_ids", "datatype": "INT64", "dims": [-1]}],
            "outputs": [{"name": "token_id", "datatype": "INT64", "dims": [1]}],
            "max_queue_size": 256,
        },
    }


def _batching(runtime: str) -> dict:
    if runtime == "causal_lm":
        return {"max_batch_size": 32, "instances": 1, "threads": 2}
    return {"max_batch_size": 32, "preferred_batch_sizes": [8, 16, 32], "instances": 1, "threads": 2}


RUNTIMES: dict[str, Callable[[_Folder], dict]] = {
    "sentence_embedding": _sentence_embedding,
    "sequence_classification": _sequence_classification,
    "token_classification": _token_classification,
    "masked_lm": _masked_lm,
    "question_answering": _question_answering,
    "vision_classification": _vision_classification,
    "causal_lm": _causal_lm,
}
