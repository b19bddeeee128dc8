"""The same tasks with huggingface_hub 0.36.2 (a release before the 1.x line; `requests`-based,
zero-shot parsed as a dict). It cannot share this venv with the current release, so `make test`
installs it into .venv/hf-0.36 and this test runs it in a subprocess with that folder first on
the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from services.models.builders import digits
from tests.helpers import MODEL_ID, REPO

pytestmark = pytest.mark.xdist_group("mesh")

OLD_HUB = REPO / ".venv" / "hf-0.36"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import huggingface_hub
    from huggingface_hub import InferenceClient

    url, model, image_path = sys.argv[1:4]
    image = open(image_path, "rb").read()
    tc = InferenceClient(model=f"{url}/models/meshserve/sentiment-minilm")
    zs = InferenceClient(model=f"{url}/models/{model}/pipeline/zero-shot-classification")
    ss = InferenceClient(model=f"{url}/models/{model}/pipeline/sentence-similarity")
    fe = InferenceClient(model=f"{url}/models/{model}")
    ic = InferenceClient(model=f"{url}/models/meshserve/digits-cnn")
    out = {
        "version": huggingface_hub.__version__,
        "text_classification": [[e.label, e.score] for e in tc.text_classification("I adore this little cafe.")],
        "text_classification_top1": [e.label for e in tc.text_classification("Cold food, rude staff.", top_k=1)],
        "zero_shot": [[e.label, e.score] for e in zs.zero_shot_classification(
            "The football team won the match after extra time.", candidate_labels=["sport", "politics", "cooking"])],
        "similarity": ss.sentence_similarity("a cat", other_sentences=["a kitten", "tax law"]),
        "similarity_model_url": fe.sentence_similarity("a cat", other_sentences=["a kitten", "tax law"]),
        "features": list(fe.feature_extraction("hello").shape),
        "image_bytes": [e.label for e in ic.image_classification(image)],
        "image_path": [e.label for e in ic.image_classification(image_path)],
        "image_top2": [e.label for e in ic.image_classification(image, top_k=2)],
    }
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not (OLD_HUB / "huggingface_hub").exists(), reason="huggingface_hub 0.36 not installed: make test")
def test_huggingface_hub_0_36_every_task(mesh, tmp_path):
    _, _, images, labels = digits.split()
    path = tmp_path / "digit.png"
    path.write_bytes(digits.render_png(images[5]))
    env = {**os.environ, "PYTHONPATH": f"{OLD_HUB}{os.pathsep}{REPO}"}
    env.pop("HF_HUB_OFFLINE", None)  # offline mode blocks loopback requests too
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, mesh.url, MODEL_ID, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["version"] == "0.36.2"
    assert out["text_classification"][0][0] == "POSITIVE" and len(out["text_classification"]) == 2
    assert out["text_classification_top1"] == ["NEGATIVE"]
    assert out["zero_shot"][0][0] == "sport" and [lbl for lbl, _ in out["zero_shot"]] != []
    assert sum(score for _, score in out["zero_shot"]) == pytest.approx(1.0, abs=1e-5)
    assert out["similarity"][0] > out["similarity"][1]
    assert out["similarity_model_url"] == pytest.approx(out["similarity"], abs=1e-6)  # dispatched by input shape
    assert out["features"] == [384]
    label = str(labels[5])
    assert out["image_bytes"][0] == out["image_path"][0] == out["image_top2"][0] == label
    assert len(out["image_bytes"]) == 5 and len(out["image_top2"]) == 2
