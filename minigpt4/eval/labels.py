"""How a result names the projector that produced it: the words of the results table's projector column, of
metrics.json's "projector" and of an export's model card, from one place so they never drift apart."""
from __future__ import annotations


def projector_label(model_cfg) -> str:
    """linear | vib-fixed-beta (β=…, S=…) | adavib (β=…, S=…), from a `model:` config (or anything with its
    mm_projector_type and vib fields)."""
    if model_cfg.mm_projector_type == "linear":
        return "linear"
    kind = "adavib" if model_cfg.vib.adaptive else "vib-fixed-beta"
    return f"{kind} (β={model_cfg.vib.beta:g}, S={model_cfg.vib.num_samples})"
