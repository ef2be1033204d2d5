"""The name a loaded model's tensor is stored under in its checkpoint, where transformers renames it.

transformers 5 loads some checkpoints under other names than they are stored under, and `save_pretrained`
renames them back. Gemma 3's image-and-text checkpoints store `language_model.model.layers.0...`, and the loaded
model (so PEFT's adapter keys, `base_model.model.model.language_model.layers.0...`) calls it
`model.language_model.layers.0...`. That is not a prefix difference (`averaging.base_names` handles those), so
`unlearn merge --adapter` refused such a base: "BASE has no tensor model.language_model.layers.0...".

The renaming is transformers' own (`conversion_mapping`), read from a model built on the meta device from BASE's
config, so no weight is read or allocated; only for transformers' own classes (a model whose code ships with the
checkpoint runs no code here). Those are internal APIs: where they are missing or fail, no name is mapped, and the
caller's "has no tensor" message stands.
"""

from __future__ import annotations

import contextlib
import io
import warnings


def stored_names(config: dict, names: list[str]) -> dict[str, str]:
    """{name: the name it is stored under} for those of NAMES (a loaded model's tensor names) that the model CONFIG
    describes saves under another name; names it would save under their own are left out, and {} when the model
    class is not transformers' own or has no renaming."""
    if not names or config.get("auto_map"):
        return {}
    try:
        transforms = _save_renamings(config, _architecture(config))
    except Exception:  # noqa: BLE001 - transformers' internals moved or the class cannot be built: map nothing
        return {}
    if transforms is None:
        return {}
    from transformers.core_model_loading import apply_converters, apply_renamings

    renamings, converters = transforms
    found = {}
    for name in names:
        if apply_converters(name, converters)[1] is not None:
            continue  # split or fused on saving (experts, packed projections): no one stored tensor is this one
        stored = apply_renamings(name, renamings)
        if stored != name:
            found[name] = stored
    return found


def _architecture(config: dict) -> str | None:
    """The class CONFIG's checkpoint is a model of: its `architectures`, else the causal LM class transformers
    loads for its `model_type` (what `unlearn run` loads it as: `AutoModelForCausalLM`)."""
    if config.get("architectures"):
        return config["architectures"][0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))


def _save_renamings(config: dict, architecture: str | None):
    """(renamings, converters) that `save_pretrained` applies, in its order, for a model of ARCHITECTURE; None when
    the class is not transformers' or renames nothing."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None or not hasattr(model_class, "config_class"):
        return None
    model_config = model_class.config_class.from_dict(dict(config))
    # building the model prints nothing a merge should show (warnings about unused config fields and the like)
    with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = model_class(model_config)
    # as transformers.core_model_loading.revert_weight_conversion does for a model not loaded by from_pretrained:
    # no legacy renaming, no prefix change (it would add a prefix the checkpoint may not have had), reversed
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    if not conversions:
        return None
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    return ([c for c in reverse if isinstance(c, WeightRenaming)],
            [c for c in reverse if isinstance(c, WeightConverter)])
