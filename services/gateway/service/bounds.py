"""Input-token bounds without a tokenizer: what admission reserves before any work starts.

A text never yields more tokens than its UTF-8 bytes plus the two special tokens, nor more than
the model's token limit (longer texts are truncated or refused). So admission costs no
preprocessing RPC and coalescing stays possible; settlement charges the real counts.
"""

from __future__ import annotations

from meshserve.tasks.v1 import tasks_pb2

from services.common import caps
from services.common.catalog import ModelEntry


def text_token_bound(entry: ModelEntry, texts, prompt_name: str | None = None) -> int:
    """Most tokens these texts can be encoded to (see the module docstring), the model's prompt
    (`prompt_name`, else its default prompt) before each included."""
    limit = entry.preprocess.max_length
    prompts, default = entry.preprocess.prompts, entry.preprocess.default_prompt_name
    extra = len(prompts.get(prompt_name or default or "", "").encode()) + 2
    return sum(min(limit, len(t.encode()) + extra) for t in texts)


def zero_shot_token_bound(entry: ModelEntry, texts, labels, template: str | None) -> int:
    """Most tokens of a zero-shot request: each text, and per text one hypothesis per label (the
    template with the label in place of its one `{}`). Arithmetic on the UTF-8 lengths: no
    hypothesis is built (a list of them costs labels x template bytes, here before admission)."""
    limit = entry.preprocess.max_length
    template = template or entry.postprocess.zero_shot.hypothesis_template
    around = len(template.encode())  # the template less its `{}` (2 bytes), plus 2 special tokens
    per_text = sum(min(limit, around + len(label.encode())) for label in labels)
    return text_token_bound(entry, texts) + len(texts) * per_text


def token_bound(entry: ModelEntry, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters) -> int:
    """Most input tokens of a task request, after refusing it if it is over an input cap
    (caps.check_task_inputs: counts, lengths, image headers), on REST and gRPC alike."""
    caps.check_task_inputs(entry, inputs, parameters)
    kind = inputs.WhichOneof("kind")
    if kind == "text":
        texts = inputs.text.texts
        if parameters.candidate_labels:  # zero-shot: each text and one hypothesis per label
            return zero_shot_token_bound(entry, texts, parameters.candidate_labels, parameters.hypothesis_template)
        return text_token_bound(entry, texts, parameters.prompt_name or None)
    if kind == "sentence_similarity":
        sim = inputs.sentence_similarity
        return text_token_bound(entry, [sim.source_sentence, *sim.sentences], parameters.prompt_name or None)
    return 0  # images: no tokens
