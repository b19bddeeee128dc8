"""Folders that cannot be served are refused with a message naming the file and field, by
`meshserve models add` and by `meshserve up --model` (exit 2, nothing started, no traceback); a
catalog.d entry whose folder vanished leaves the rest of a running mesh serving."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import MODEL_ID, free_port, mesh_home, shipped_subset
from tests.usermodels.conftest import add_models, empty_catalog, run_cli, serve_folders
from tests.usermodels.factory import built, wordpiece

pytestmark = pytest.mark.xdist_group("usermodels")
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _bert_classifier(folder: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    wordpiece(folder, model_max_length=128)
    config = BertConfig(vocab_size=30522, max_position_embeddings=128, num_labels=2, **SMALL)
    BertForSequenceClassification(config).eval().save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def _vit_without_processor(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, num_labels=3, **SMALL)
    ViTForImageClassification(config).eval().save_pretrained(str(folder))


def _unknown_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForTimeTravel"]
    (folder / "config.json").write_text(json.dumps(config))


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _corrupt_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], "hidden_size": ')


def _missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()


# case -> (the folder it starts from, what breaks it, words the message must hold: the file, the field)
CASES: dict[str, tuple[Callable[[Path], None], Callable[[Path], None] | None, tuple[str, ...]]] = {
    "unknown-architecture": (_bert_classifier, _unknown_architecture, ("config.json", "architectures", "Frobnicator")),
    "no-tokenizer": (_bert_classifier, _no_tokenizer, ("tokenizer",)),
    "corrupt-config": (_bert_classifier, _corrupt_config, ("config.json", "json")),
    "missing-config": (_bert_classifier, _missing_config, ("config.json",)),
    "image-without-processor": (_vit_without_processor, None, ("preprocessor_config.json",)),
}


def broken_folder(case: str, tmp_path: Path) -> Path:
    """A copy of a small valid folder, broken the way `case` says."""
    base, breaker, _ = CASES[case]
    folder = tmp_path / case
    shutil.copytree(built(f"unservable/{base.__name__.strip('_')}", base), folder)
    if breaker is not None:
        breaker(folder)
    return folder


def assert_readable_refusal(done, case: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{output}"
    assert "Traceback" not in output, output
    for word in CASES[case][2]:
        assert word.lower() in output.lower(), f"{word!r} not named in:\n{output}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_models_add_refuses_an_unservable_folder_naming_file_and_field(case, tmp_path):
    home = mesh_home(tmp_path / "home")
    done = run_cli(home, "models", "add", str(broken_folder(case, tmp_path)), "--id", f"test/{case}")
    assert_readable_refusal(done, case)
    assert not list(home.glob("catalog.d/**/*.yaml")), "a refused folder left a catalog.d entry"


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    home = mesh_home(tmp_path / "home")
    done = run_cli(home, "models", "add", str(broken_folder("unknown-architecture", tmp_path)), "--id", "test/x")
    assert "ForSequenceClassification" in done.stdout + done.stderr  # the supported choices


def _processes_of(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("MESHSERVE_HOME") == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_up_model_refuses_an_unservable_folder_and_starts_nothing(case, tmp_path):
    home = mesh_home(tmp_path / "home")
    port = free_port()
    folder = broken_folder(case, tmp_path)
    done = run_cli(
        home, "up", "--no-build", "--backend", "embedded", "--model", f"test/{case}={folder}",
        catalog=empty_catalog(tmp_path), timeout_s=120, extra_env={"MESHSERVE_GATEWAY_HTTP_PORT": str(port)},
    )  # fmt: skip
    assert_readable_refusal(done, case)
    assert _processes_of(home) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)


def _wait_serving(url: str, model_id: str, timeout_s: float = 300) -> None:
    """The per-model health answers 200 (the mesh runs without strict readiness: one model is gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # a slow answer under load: ask again
            if httpx.get(f"{url}/models/{model_id}/health", timeout=10).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{model_id} not serving in {timeout_s} s")


def test_a_vanished_folder_leaves_the_rest_of_the_mesh_serving(models_dir, tmp_path):
    good = built("unservable/bert_classifier", _bert_classifier)
    doomed = tmp_path / "doomed"
    shutil.copytree(good, doomed)
    home = mesh_home(tmp_path / "home")
    add_models(home, {"test/kept": good, "test/vanished": doomed})
    shutil.rmtree(doomed)
    mesh = serve_folders(
        tmp_path, {}, "embedded", home=home, catalog=shipped_subset(tmp_path / "catalog.yaml", (MODEL_ID,)),
        extra_env={"MESHSERVE_INFERENCE_STRICT_READINESS": "false"},
    )  # fmt: skip
    try:
        for model_id in (MODEL_ID, "test/kept"):
            _wait_serving(mesh.url, model_id)
            assert httpx.post(f"{mesh.url}/models/{model_id}", json={"inputs": "hello"}, timeout=60).status_code == 200
        reply = httpx.post(f"{mesh.url}/models/test/vanished", json={"inputs": "hello"}, timeout=60)
        assert reply.status_code in (404, 409, 422, 503), reply.text
        assert "test/vanished" in reply.text, reply.text
        assert httpx.get(f"{mesh.url}/models/test/kept/health", timeout=10).status_code == 200
    finally:
        mesh.stop()
