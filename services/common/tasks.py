"""Task names: Hugging Face task ids <-> the `meshserve.tasks.v1.Task` enum."""

from __future__ import annotations

from meshserve.tasks.v1 import tasks_pb2

from services.common.catalog import TASKS
from services.common.errors import ErrorCode, MeshError

_TO_PB = {task: tasks_pb2.Task.Value("TASK_" + task.upper().replace("-", "_")) for task in TASKS}
_FROM_PB = {value: task for task, value in _TO_PB.items()}


def task_to_pb(task: str) -> int:
    return _TO_PB[task]


def task_from_pb(value: int) -> str | None:
    """The HF task id, or None for TASK_UNSPECIFIED (the model's default applies)."""
    if value == tasks_pb2.TASK_UNSPECIFIED:
        return None
    try:
        return _FROM_PB[value]
    except KeyError:
        raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"unknown task enum value {value}", param="task") from None
