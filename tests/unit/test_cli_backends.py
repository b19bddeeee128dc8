"""`meshserve up --backend triton` on an install without the `[triton]` extra: one clear line that
says what to install (or which binary to point at), exit code 2, and nothing started."""

from __future__ import annotations

import sys

import pytest

from services import cli


def test_up_with_triton_but_no_triton_installed_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "pytriton", None)  # as if nvidia-pytriton were not installed
    monkeypatch.delenv("MESHSERVE_INFERENCE_TRITON_BINARY", raising=False)
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("MESHSERVE_INFERENCE_BACKEND", "embedded")  # restored after cli.main sets it
    assert not cli.triton_installed()
    assert cli.main(["up", "--backend", "triton", "--no-build"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'meshserve[triton]'" in err[0]
    assert "MESHSERVE_INFERENCE_TRITON_BINARY" in err[0]
    assert not (tmp_path / "run").exists()  # nothing was prepared or started


def test_a_tritonserver_binary_is_enough_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytriton", None)
    monkeypatch.setenv("MESHSERVE_INFERENCE_TRITON_BINARY", "/opt/tritonserver/bin/tritonserver")
    assert cli.triton_installed()


def test_the_installed_wheel_is_found(monkeypatch):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the [triton] extra) is not installed")
    monkeypatch.delenv("MESHSERVE_INFERENCE_TRITON_BINARY", raising=False)
    assert cli.triton_installed()
