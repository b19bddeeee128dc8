"""Writes the Triton model repository for a GPU node: the init container of the gpu overlay's inference pod.

    python -m deploy.k8s.triton_repository --out /var/lib/meshserve/tritonserver/models

It runs in the meshserve image (which has the catalog reader and the generator,
services/common/triton_repository.py) into the pod's shared emptyDir; NVIDIA's Triton server in
the next container serves what it wrote. The instance kind is given, not detected: the init
container requests no GPU, so torch would see none and the generator would choose KIND_CPU.
The model folders the configs point to (MESHSERVE_MODEL_DIR) are under MESHSERVE_HOME/models,
where the `models` init container builds them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.catalog import Catalog
from services.common.settings import CommonSettings
from services.common.triton_repository import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="repository folder (replaced)")
    parser.add_argument("--kind", choices=["gpu", "cpu"], default="gpu", help="instance_group kind (default gpu)")
    args = parser.parse_args(argv)
    settings = CommonSettings()
    catalog = Catalog.load(settings.catalog)
    generate(catalog, settings.models_dir, args.out, gpu=args.kind == "gpu")
    for entry in catalog.models:
        print(f"{entry.inference.name}: {args.out / entry.inference.name} ({args.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
