"""Per-request input caps: the dimensions that multiply work (texts, candidate labels x texts,
label and template lengths, images x pixels), checked where a request is parsed, before
admission and before any work that grows with the input. The gateway checks them on REST and
gRPC alike; preprocess checks them again before it builds or decodes anything (defence in depth:
it serves any caller of its port). Every check is arithmetic on lengths or reads image headers
only, so a refusal costs microseconds whatever the request holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshserve.tasks.v1 import tasks_pb2

from services.common import images
from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid

# Longest candidate label and hypothesis template (characters). Each hypothesis is built once per
# label and embedded once per text: without these a 1 MiB body could ask for gigabytes of rows.
MAX_LABEL_CHARS = 256
MAX_TEMPLATE_CHARS = 1024
LABELS = "parameters.candidate_labels"
TEMPLATE = "parameters.hypothesis_template"


def _too_large(message: str, param: str) -> MeshError:
    return MeshError(ErrorCode.PAYLOAD_TOO_LARGE, message, param=param)


def check_texts(entry: ModelEntry, texts: Sequence[str], *, field: str = "inputs") -> None:
    """At most `max_items` texts of at most `max_chars` characters each (len() of a str is O(1))."""
    spec = entry.preprocess
    if len(texts) > spec.max_items:
        raise _too_large(f"`{field}` has {len(texts)} texts; this model takes at most {spec.max_items}", field)
    for i, text in enumerate(texts):
        if len(text) > spec.max_chars:
            raise _too_large(f"`{field}[{i}]` has {len(text)} characters; the limit is {spec.max_chars}", field)


def check_zero_shot(entry: ModelEntry, texts: int, labels: Sequence[str], template: str | None) -> None:
    """Candidate labels: at least one, at most the model's `max_candidate_labels`, each at most
    MAX_LABEL_CHARS; the template at most MAX_TEMPLATE_CHARS with `{}` once; and the rows
    (texts x (1 + labels)) within `max_items`. Refused before any hypothesis is built."""
    limit = entry.preprocess.max_candidate_labels
    if not labels:
        raise invalid(f"`{LABELS}` must name at least one label", param=LABELS)
    if len(labels) > limit:
        raise invalid(f"`{LABELS}` has {len(labels)} labels; the limit is {limit}", param=LABELS)
    for i, label in enumerate(labels):
        if len(label) > MAX_LABEL_CHARS:
            raise invalid(f"`{LABELS}[{i}]` has {len(label)} characters; the limit is {MAX_LABEL_CHARS}", param=LABELS)
    if template:  # empty or None: the model's default
        if len(template) > MAX_TEMPLATE_CHARS:
            raise invalid(
                f"`{TEMPLATE}` has {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}", param=TEMPLATE
            )
        if template.count("{}") != 1:
            raise invalid(f"`{TEMPLATE}` must contain `{{}}` exactly once (where the label goes)", param=TEMPLATE)
    rows = texts * (1 + len(labels))
    if rows > entry.preprocess.max_items:
        raise _too_large(
            f"{texts} texts x {len(labels)} candidate labels need {rows} rows; "
            f"this model takes at most {entry.preprocess.max_items} per request",
            LABELS,
        )


def check_images(entry: ModelEntry, data: Sequence[bytes], *, field: str = "inputs") -> None:
    """At most `max_items` images, each and all together within the pixel caps, from the headers."""
    if len(data) > entry.preprocess.max_items:
        raise _too_large(
            f"`{field}` has {len(data)} images; this model takes at most {entry.preprocess.max_items}", field
        )
    # A user's vision model (no preprocess.image) gets the default per-image pixel cap.
    images.check_sizes(data, entry.preprocess.image, field=field)


def check_task_inputs(entry: ModelEntry, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters) -> None:
    """Every cap of one typed task request (what the gateway parsed from REST or received on gRPC)."""
    kind = inputs.WhichOneof("kind")
    if kind == "text":
        check_texts(entry, inputs.text.texts)
        if parameters.candidate_labels:
            template = parameters.hypothesis_template if parameters.HasField("hypothesis_template") else None
            check_zero_shot(entry, len(inputs.text.texts), parameters.candidate_labels, template)
    elif kind == "sentence_similarity":
        sim = inputs.sentence_similarity
        check_texts(entry, [sim.source_sentence, *sim.sentences], field="inputs.sentences")
    elif kind == "images":
        check_images(entry, inputs.images.images)
    elif kind == "text_pairs":
        pairs = inputs.text_pairs.pairs
        check_texts(entry, [p.text for p in pairs])
        check_texts(entry, [p.text_pair for p in pairs], field="inputs.text_pair")
    elif kind == "text_ranking":
        ranking = inputs.text_ranking
        if not ranking.query.strip():
            raise invalid("`query` is empty", param="query")
        check_texts(entry, [ranking.query], field="inputs.query")
        check_texts(entry, ranking.documents, field="inputs.documents")
    elif kind == "question_answering":
        items = inputs.question_answering.items
        check_texts(entry, [i.question for i in items], field="inputs.question")
        check_texts(entry, [i.context for i in items], field="inputs.context")
