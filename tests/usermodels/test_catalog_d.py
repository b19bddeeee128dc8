"""Added models: `models add` + `up` and `up --model` serve the same entry for the same folder; ids
with '/' work in every URL; `models list` and `GET /v1/models` show the user models."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.xdist_group("usermodels")


def test_every_user_folder_is_accepted(user_mesh):
    print(f"user_mesh[{user_mesh.backend}] started in {user_mesh.start_s:.1f} s")
    assert user_mesh.refused == {}


def test_v1_models_lists_every_user_model_and_nothing_else(user_mesh, user_folders):
    listed = httpx.get(f"{user_mesh.url}/v1/models", timeout=30).json()["data"]
    assert sorted(m["id"] for m in listed) == sorted(set(user_folders) - set(user_mesh.refused))
