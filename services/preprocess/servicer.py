"""gRPC PreprocessService over the transport-neutral Preprocessor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from meshserve.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import IMAGE_TASKS
from services.common.errors import invalid
from services.common.tasks import task_from_pb
from services.common.tensors import to_pb
from services.preprocess import fill_mask, pairs, question_answering, token_classification, tokenization
from services.preprocess.core import Encoded, Preprocessor
from services.preprocess.tools import tool_chat

TEXT_TASKS = ("feature-extraction", "text-classification")

# Tasks with an encoder of their own (one module each): (core, request) -> Encoded. The tasks not
# listed here are the text and image tasks that `Preprocess` below handles.
Encoder = Callable[[Preprocessor, preprocess_pb2.PreprocessRequest], Awaitable[Encoded]]
TASK_ENCODERS: dict[str, Encoder] = {
    "text-classification": pairs.encode_text_classification,
    "text-ranking": pairs.encode_text_ranking,
    "token-classification": token_classification.encode_token_classification,
    "fill-mask": fill_mask.encode_fill_mask,
    "question-answering": question_answering.encode_question_answering,
}


def texts_of(task: str, inputs: tasks_pb2.TaskInputs) -> tuple[list[str], str]:
    """The texts to encode for a task, and the request field they came from (for errors)."""
    kind = inputs.WhichOneof("kind")
    if task in TEXT_TASKS or task == "zero-shot-classification":
        if kind != "text":
            raise invalid(f"{task} takes text inputs", param="inputs")
        return list(inputs.text.texts), "inputs"
    if task == "sentence-similarity":
        if kind != "sentence_similarity":
            raise invalid("sentence-similarity takes {source_sentence, sentences}", param="inputs")
        sim = inputs.sentence_similarity
        if not sim.source_sentence.strip():
            raise invalid("`inputs.source_sentence` is empty", param="inputs.source_sentence")
        if not sim.sentences:
            raise invalid("`inputs.sentences` must contain at least one sentence", param="inputs.sentences")
        return [sim.source_sentence, *sim.sentences], "inputs.sentences"
    raise invalid(f"preprocess does not handle task {task!r}", param="task")


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, core: Preprocessor) -> None:
        self.core = core

    async def Preprocess(self, request: preprocess_pb2.PreprocessRequest, context) -> preprocess_pb2.PreprocessResponse:
        task = task_from_pb(request.task)
        if task is None:
            raise invalid("task must be set", param="task")
        params = request.parameters
        if request.inputs.WhichOneof("kind") == "token_ids":
            items = [list(item.ids) for item in request.inputs.token_ids.items]
            encoded = await self.core.encode_token_ids(request.model_id, task, items)
        elif task in TASK_ENCODERS:
            encoded = await TASK_ENCODERS[task](self.core, request)
        elif task in IMAGE_TASKS:
            if request.inputs.WhichOneof("kind") != "images":
                raise invalid(f"{task} takes image inputs", param="inputs")
            images = list(request.inputs.images.images)
            encoded = await self.core.encode_images(request.model_id, task, images, field="inputs")
        else:
            texts, field = texts_of(task, request.inputs)
            truncate = params.truncate if params.HasField("truncate") else True
            if task == "zero-shot-classification":
                template = params.hypothesis_template if params.HasField("hypothesis_template") else None
                encoded = await self.core.encode_zero_shot(
                    request.model_id, texts, list(params.candidate_labels), template, truncate=truncate
                )
            else:
                prompt_name = params.prompt_name if params.HasField("prompt_name") else None
                encoded = await self.core.encode_texts(
                    request.model_id, task, texts, truncate=truncate, field=field, prompt_name=prompt_name
                )
        return preprocess_pb2.PreprocessResponse(
            tensors=[to_pb(name, array) for name, array in encoded.tensors.items()],
            usage=tasks_pb2.Usage(
                input_tokens=encoded.input_tokens, items=encoded.items, item_input_tokens=encoded.item_tokens
            ),
            side_tensors=[to_pb(name, array) for name, array in encoded.side.items()],
        )

    async def PrepareGeneration(self, request: preprocess_pb2.PrepareGenerationRequest, context):
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise invalid("a generation request needs `messages` or a `prompt`", param="messages")
        messages = [(m.role, m.content) for m in request.messages.messages] if kind == "messages" else None
        max_new = request.max_new_tokens if request.HasField("max_new_tokens") else None
        tools = tool_chat(request.tools_json, request.messages.messages) if kind == "messages" else None
        prompt = await self.core.prepare_generation(request.model_id, messages, request.text, max_new, tools=tools)
        return preprocess_pb2.PrepareGenerationResponse(
            input_ids=prompt.input_ids, max_new_tokens=prompt.max_new_tokens, stop_token_ids=prompt.stop_token_ids
        )

    async def Tokenize(self, request: preprocess_pb2.TokenizeRequest, context) -> preprocess_pb2.TokenizeResponse:
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise invalid("`prompt` or `messages` is required", param="prompt")
        if kind == "messages":
            messages = [(m.role, m.content) for m in request.messages.messages]
            text = tokenization.Chat(messages, request.add_generation_prompt, request.continue_final_message)
        else:
            text = request.text
        tokens = tokenization.tokenize(self.core, request.model_id, text, request.add_special_tokens)
        return preprocess_pb2.TokenizeResponse(
            tokens=tokens.ids, max_model_len=tokens.max_model_len, token_strs=tokens.strs
        )

    async def Detokenize(self, request: preprocess_pb2.DetokenizeRequest, context) -> preprocess_pb2.DetokenizeResponse:
        prompt = tokenization.detokenize(self.core, request.model_id, list(request.tokens))
        return preprocess_pb2.DetokenizeResponse(prompt=prompt)
