"""Catalog entries inferred from model folders: one case per architecture family, one per refusal.

Inference reads only the folder's small files, so these folders hold a config and a tokenizer and no
weights; the refusals assert that the message names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import (
    BertConfig,
    ConvNextConfig,
    ConvNextImageProcessor,
    GenerationConfig,
    LlamaConfig,
    RobertaConfig,
    ViTConfig,
    ViTImageProcessor,
)

from services.common.catalog import Source
from services.models.from_folder import FolderError, entry_from_folder, infer_folder, inference_name
from tests.usermodels.factory import byte_bpe, wordpiece

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def bert(folder: Path, architecture: str, **config) -> Path:
    BertConfig(architectures=[architecture], **SMALL, **config).save_pretrained(folder)
    wordpiece(folder)
    return folder


def tensors(specs) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {t.name: (t.datatype, t.dims) for t in specs}


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_text_classifier_takes_labels_by_index_and_softmax(tmp_path):
    folder = bert(tmp_path, "BertForSequenceClassification", id2label={0: "neg", 1: "neu", 2: "pos"})
    entry = entry_from_folder(folder, model_id="acme/sentiment")
    assert entry.tasks == ("text-classification",)
    assert entry.inference.runtime == "sequence_classification"
    assert entry.postprocess.labels == ("neg", "neu", "pos")
    assert entry.postprocess.activation == "softmax"
    assert tensors(entry.inference.outputs) == {"logits": ("FP32", (3,))}
    assert tensors(entry.inference.inputs) == {
        n: ("INT64", (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids")
    }
    assert entry.preprocess.max_length == 512
    assert entry.source == Source(kind="path", path=str(folder.resolve()))
    assert entry.inference.name == "acme--sentiment"
    assert entry.preprocess.max_items <= entry.inference.max_queue_size


@pytest.mark.parametrize(
    ("config", "activation"),
    [
        ({"problem_type": "multi_label_classification", "num_labels": 3}, "sigmoid"),
        ({"problem_type": "regression", "num_labels": 1}, "none"),
        ({"num_labels": 2}, "softmax"),
    ],
)
def test_activation_follows_problem_type(tmp_path, config, activation):
    entry = entry_from_folder(bert(tmp_path, "BertForSequenceClassification", **config), model_id="m")
    assert entry.postprocess.activation == activation


def test_one_label_classifier_is_a_reranker_first(tmp_path):
    entry = entry_from_folder(bert(tmp_path, "BertForSequenceClassification", num_labels=1), model_id="acme/rr")
    assert entry.tasks == ("text-ranking", "text-classification")
    assert entry.postprocess.activation == "sigmoid"
    assert tensors(entry.inference.outputs) == {"logits": ("FP32", (1,))}


def test_cross_encoder_identity_activation_is_kept(tmp_path):
    folder = bert(tmp_path, "BertForSequenceClassification", num_labels=1)
    write(
        folder / "config_sentence_transformers.json",
        {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.linear.Identity"},
    )
    assert entry_from_folder(folder, model_id="m").postprocess.activation == "none"


def test_task_option_picks_the_default_among_the_models_tasks(tmp_path):
    folder = bert(tmp_path, "BertForSequenceClassification", num_labels=1)
    entry = entry_from_folder(folder, model_id="m", task="text-classification")
    assert entry.tasks == ("text-classification", "text-ranking")
    with pytest.raises(FolderError, match=r"task 'fill-mask'.*choices: text-ranking, text-classification"):
        entry_from_folder(folder, model_id="m", task="fill-mask")


def test_roberta_token_classifier_limit_leaves_out_the_position_offset(tmp_path):
    byte_bpe(tmp_path, model_max_length=1_000_000_000_000)  # no usable model_max_length: positions decide
    RobertaConfig(
        architectures=["RobertaForTokenClassification"], id2label={0: "O", 1: "B-PER", 2: "I-PER"},
        max_position_embeddings=130, pad_token_id=1, vocab_size=1000, **SMALL,
    ).save_pretrained(tmp_path)  # fmt: skip
    entry = entry_from_folder(tmp_path, model_id="acme/ner")
    assert entry.tasks == ("token-classification",)
    assert entry.preprocess.max_length == 128
    assert tensors(entry.inference.outputs) == {"logits": ("FP32", (-1, 3))}
    assert tensors(entry.inference.inputs).keys() == {"input_ids", "attention_mask"}
    assert entry.postprocess.labels == ("O", "B-PER", "I-PER")


def test_masked_lm_outputs_vocab_logits_per_mask(tmp_path):
    entry = entry_from_folder(bert(tmp_path, "BertForMaskedLM", vocab_size=30522), model_id="m")
    assert entry.tasks == ("fill-mask",)
    assert tensors(entry.inference.outputs) == {"mask_logits": ("FP32", (-1, 30522))}


def test_question_answering_outputs_start_and_end_logits(tmp_path):
    entry = entry_from_folder(bert(tmp_path, "BertForQuestionAnswering"), model_id="m")
    assert entry.tasks == ("question-answering",)
    assert tensors(entry.inference.outputs) == {"start_logits": ("FP32", (-1,)), "end_logits": ("FP32", (-1,))}


def test_vit_pixels_come_from_the_processor_size(tmp_path):
    ViTConfig(architectures=["ViTForImageClassification"], id2label={0: "cat", 1: "dog"}, **SMALL).save_pretrained(
        tmp_path
    )
    ViTImageProcessor(size={"height": 48, "width": 40}).save_pretrained(tmp_path)
    entry = entry_from_folder(tmp_path, model_id="acme/vit")
    assert entry.tasks == ("image-classification",)
    assert entry.preprocess.kind == "image" and entry.preprocess.image is None
    assert tensors(entry.inference.inputs) == {"pixel_values": ("FP32", (3, 48, 40))}
    assert entry.postprocess.labels == ("cat", "dog") and entry.postprocess.top_k == 5


def test_convnext_shortest_edge_gives_a_square(tmp_path):
    ConvNextConfig(architectures=["ConvNextForImageClassification"], num_labels=4).save_pretrained(tmp_path)
    ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(tmp_path)
    entry = entry_from_folder(tmp_path, model_id="m")
    assert tensors(entry.inference.inputs) == {"pixel_values": ("FP32", (3, 64, 64))}


def llama(folder: Path, **generation) -> Path:
    byte_bpe(folder, encoder=False)
    LlamaConfig(
        architectures=["LlamaForCausalLM"], max_position_embeddings=256, vocab_size=1000, **SMALL
    ).save_pretrained(folder)
    if generation:
        GenerationConfig(**generation).save_pretrained(folder)
    return folder


def test_causal_lm_limits_follow_the_context(tmp_path):
    entry = entry_from_folder(llama(tmp_path, eos_token_id=2), model_id="acme/lm")
    assert entry.tasks == ("text-generation",)
    assert entry.inference.runtime == "causal_lm"
    assert tensors(entry.inference.outputs) == {"token_id": ("INT64", (1,))}
    assert entry.preprocess.max_length == entry.preprocess.max_total_tokens == 256
    assert entry.preprocess.max_input_tokens < 256


def sentence_transformer(folder: Path, *, pooling: str, dense: int | None = None, normalize: bool = True) -> Path:
    bert(folder, "BertModel")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    write(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, f"pooling_mode_{pooling}": True})
    if dense:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        write(folder / "2_Dense" / "config.json", {"in_features": 32, "out_features": dense})
    if normalize:
        modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"})
    write(folder / "modules.json", modules)
    write(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    return folder


def test_cls_embedder_with_normalize_and_prompts(tmp_path):
    folder = sentence_transformer(tmp_path, pooling="cls_token")
    prompts = {"query": "query: ", "document": "passage: "}
    write(folder / "config_sentence_transformers.json", {"prompts": prompts, "default_prompt_name": "query"})
    entry = entry_from_folder(folder, model_id="acme/bge")
    assert entry.tasks == ("feature-extraction", "sentence-similarity")
    assert entry.inference.runtime == "sentence_embedding"
    assert tensors(entry.inference.outputs) == {"embedding": ("FP32", (32,))}
    assert entry.postprocess.normalize is True
    assert entry.preprocess.max_length == 128
    assert entry.preprocess.prompts == prompts and entry.preprocess.default_prompt_name == "query"


@pytest.mark.parametrize(
    "pooling, refused",
    [
        ({"pooling_mode": "attention"}, "'attention'"),
        ({"pooling_mode_cls_token": True, "include_prompt": False}, "include_prompt"),
    ],
)
def test_pooling_the_runtime_cannot_run_is_refused_when_added(tmp_path, pooling, refused):
    folder = sentence_transformer(tmp_path, pooling="cls_token")
    write(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": 32, **pooling})
    with pytest.raises(FolderError, match=refused) as err:
        entry_from_folder(folder, model_id="m")
    assert "1_Pooling/config.json" in str(err.value)


def test_sentence_transformers_6_pooling_config(tmp_path):
    folder = sentence_transformer(tmp_path, pooling="cls_token")
    write(folder / "1_Pooling" / "config.json", {"embedding_dimension": 32, "pooling_mode": ["cls", "max"]})
    notes = infer_folder(folder, model_id="m").notes
    assert tensors(entry_from_folder(folder, model_id="m").inference.outputs) == {"embedding": ("FP32", (64,))}
    assert "1_Pooling/config.json: pooling cls, max" in notes


def test_last_token_embedder_dims_after_dense_and_no_normalize(tmp_path):
    entry = entry_from_folder(
        sentence_transformer(tmp_path, pooling="lasttoken", dense=16, normalize=False), model_id="m"
    )
    assert tensors(entry.inference.outputs) == {"embedding": ("FP32", (16,))}
    assert entry.postprocess.normalize is False


def test_notes_say_what_came_from_which_file(tmp_path):
    notes = infer_folder(sentence_transformer(tmp_path, pooling="mean_tokens"), model_id="m").notes
    assert any(n.startswith("modules.json:") for n in notes)
    assert any(n.startswith("1_Pooling/config.json: pooling mean") for n in notes)
    assert any(n.startswith("sentence_bert_config.json: max_length 128") for n in notes)


@pytest.mark.parametrize(
    ("model_id", "name"),
    [("acme/bert-ner", "acme--bert-ner"), ("local/my model!", "local--my_model_"), ("_x/y", "x--y"), ("a.b", "a.b")],
)
def test_inference_name_follows_tritons_rules(model_id, name):
    assert inference_name(model_id) == name


# -- refusals: each names the file and the field ---------------------------------------------------


def test_missing_config_is_refused(tmp_path):
    with pytest.raises(FolderError, match=rf"{tmp_path}: no config.json"):
        entry_from_folder(tmp_path, model_id="m")


def test_not_a_folder_is_refused(tmp_path):
    with pytest.raises(FolderError, match="not a folder"):
        entry_from_folder(tmp_path / "nowhere", model_id="m")


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FolderError, match=r"config.json: invalid JSON"):
        entry_from_folder(tmp_path, model_id="m")


def test_unknown_architecture_lists_the_supported_suffixes(tmp_path):
    write(tmp_path / "config.json", {"architectures": ["T5ForConditionalGeneration"]})
    with pytest.raises(FolderError) as err:
        entry_from_folder(tmp_path, model_id="m")
    message = str(err.value)
    assert "config.json" in message and "'T5ForConditionalGeneration'" in message
    assert "ForSequenceClassification" in message and "ForCausalLM" in message and "modules.json" in message


def test_missing_architectures_names_the_field(tmp_path):
    write(tmp_path / "config.json", {"model_type": "bert"})
    with pytest.raises(FolderError, match=r"config.json: field 'architectures' is missing"):
        entry_from_folder(tmp_path, model_id="m")


def test_text_model_without_a_fast_tokenizer_is_refused(tmp_path):
    folder = bert(tmp_path, "BertForSequenceClassification")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FolderError, match=r"no tokenizer.json; a fast tokenizer is needed"):
        entry_from_folder(folder, model_id="m")


def test_image_model_without_processor_config_is_refused(tmp_path):
    ViTConfig(architectures=["ViTForImageClassification"], **SMALL).save_pretrained(tmp_path)
    with pytest.raises(FolderError, match=r"no preprocessor_config.json"):
        entry_from_folder(tmp_path, model_id="m")


def test_image_processor_without_fixed_size_is_refused(tmp_path):
    ViTConfig(architectures=["ViTForImageClassification"], **SMALL).save_pretrained(tmp_path)
    write(tmp_path / "preprocessor_config.json", {"do_center_crop": False, "size": {"longest_edge": 100}})
    with pytest.raises(FolderError, match=r"preprocessor_config.json: field 'size'"):
        entry_from_folder(tmp_path, model_id="m")


def test_causal_lm_without_eos_is_refused(tmp_path):
    folder = llama(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = None
    write(folder / "config.json", config)
    with pytest.raises(FolderError, match=r"generation_config.json: field 'eos_token_id' is missing"):
        entry_from_folder(folder, model_id="m")


def test_default_prompt_must_be_a_prompt(tmp_path):
    folder = sentence_transformer(tmp_path, pooling="mean_tokens")
    write(folder / "config_sentence_transformers.json", {"prompts": {"query": "q: "}, "default_prompt_name": "doc"})
    with pytest.raises(FolderError, match=r"config_sentence_transformers.json: field 'default_prompt_name' 'doc'"):
        entry_from_folder(folder, model_id="m")


def test_dense_without_out_features_names_the_module_file(tmp_path):
    folder = sentence_transformer(tmp_path, pooling="mean_tokens", dense=16)
    write(folder / "2_Dense" / "config.json", {"in_features": 32})
    with pytest.raises(FolderError, match=r"2_Dense/config.json: field 'out_features'"):
        entry_from_folder(folder, model_id="m")


def test_id2label_with_gaps_is_refused(tmp_path):
    folder = bert(tmp_path, "BertForSequenceClassification")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "a", "2": "c"}
    write(folder / "config.json", config)
    with pytest.raises(FolderError, match=r"config.json: field 'id2label'"):
        entry_from_folder(folder, model_id="m")
