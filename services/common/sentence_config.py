"""sentence-transformers' folder configuration, read without torch: the kind of a modules.json
entry and the modes of a Pooling config. Shared by the inference runtime (which runs the modules)
and the catalog entry inferred from a folder (which must refuse what the runtime would refuse)."""

from __future__ import annotations

# sentence-transformers' legacy pooling keys, in the order its Pooling concatenates the modes.
LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MODES = tuple(LEGACY_MODES.values())


def module_kind(module: dict) -> str:
    """A modules.json entry's class name: "Pooling", "Dense", "Normalize", "Transformer", ..."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def pooling_modes(config: dict) -> tuple[str, ...]:
    """The modes of a Pooling config.json, new (`pooling_mode`) or legacy (`pooling_mode_*`) style;
    ValueError for a mode or an option the runtime does not support."""
    mode = config.get("pooling_mode")
    if mode is None or isinstance(mode, bool):
        modes = tuple(name for key, name in LEGACY_MODES.items() if config.get(key))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"Pooling mode {unknown[0]!r} is not supported; supported: {', '.join(MODES)}")
    if config.get("include_prompt", True) is False:
        raise ValueError("Pooling with include_prompt=false (prompt tokens left out of pooling) is not supported")
    return modes
