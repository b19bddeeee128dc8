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
    if kind == "text_pairs":  # one row per pair: both texts and up to 4 special tokens
        return _pairs_bound(entry, [(p.text, p.text_pair) for p in inputs.text_pairs.pairs])
    if kind == "text_ranking":  # one row per document, with the query
        ranking = inputs.text_ranking
        return _pairs_bound(entry, [(ranking.query, d) for d in ranking.documents])
    if kind == "question_answering":
        return question_answering_bound(entry, inputs.question_answering.items, parameters)
    return 0  # images: no tokens


def _pairs_bound(entry: ModelEntry, pairs) -> int:
    limit = entry.preprocess.max_length
    return sum(min(limit, len(a.encode()) + len(b.encode()) + 4) for a, b in pairs)


def question_answering_bound(entry: ModelEntry, items, parameters: tasks_pb2.TaskParameters) -> int:
    """A question whose context fits one window costs at most its bytes plus 4 special tokens; a
    longer one is split into windows, at most `max_items` of `max_length` tokens per request."""
    cap = entry.preprocess.max_items * entry.preprocess.max_length
    window = parameters.max_seq_len if parameters.HasField("max_seq_len") else min(384, entry.preprocess.max_length)
    total = 0
    for item in items:
        size = len(item.question.encode()) + len(item.context.encode()) + 4
        total += size if size <= window else cap
    return min(total, cap)
