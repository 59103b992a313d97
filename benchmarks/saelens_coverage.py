"""How much of SAELens's pretrained directory `load_sae` reads, per conversion function and architecture.

No network: for every directory entry, the architecture is the one its
conversion function's code path gives that entry (from the release, repository
and folder names, as SAELens's converter decides). An entry is loadable when the
project accepts that conversion function and architecture (`converters.refusal`
and `saelens.ARCHITECTURES`, the checks `load_sae` makes) and its normalisation:
a converter that says `expected_average_only_in` needs the directory's
`norm_scaling_factor` (`saelens._normalization`). Where only the entry's own
cfg.json can tell (releases in SAELens's format name their architecture and
normalisation there), the entry is counted in a row of its own, not as loadable.
Prints a Markdown table (the one in docs/formats.md).

    python benchmarks/saelens_coverage.py
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sae_acceptance.sources.formats import saelens
from sae_acceptance.sources.formats.converters import refusal

NEEDS_SCALE = ("llama_scope", "llama_scope_r1_distill")  # their converters say expected_average_only_in
NO_FACTOR_NEEDED = ("none", "constant_norm_rescale", "layer_norm")  # normalisations read without a factor
LOADABLE, REFUSED, UNKNOWN = "loadable", "refused", "cfg.json decides"


def architecture(func: str, release: str, folder: str) -> str:
    """The SAELens architecture the converter gives this entry (sae_lens: whatever its cfg.json says)."""
    if func == "gemma_3" and ("transcoder" in folder or "clt" in folder):
        return "jumprelu_skip_transcoder" if "affine" in folder else "jumprelu_transcoder"
    fixed = {
        "gemma_2": "jumprelu",
        "gemma_3": "jumprelu",
        "llama_scope": "jumprelu",
        "llama_scope_r1_distill": "jumprelu",
        "qwen_scope": "topk",
        "deepseek_r1": "standard",
        "goodfire": "standard",
        "connor_rob_hook_z": "standard",
        "gemma_2_transcoder": "jumprelu_transcoder",
        "mwhanna_transcoder": "transcoder",
        "mntss_clt_layer_transcoder": "transcoder",
        "temporal": "temporal",
    }
    if func in fixed:
        return fixed[func]
    if func == "dictionary_learning_1":  # the dict_class is in config.json; SAEBench names it in the release
        for marker, arch in (
            ("gated", "gated"),
            ("jumprelu", "jumprelu"),
            ("batch_top_k", "jumprelu (batchtopk)"),
            ("matryoshka", "jumprelu (matryoshka)"),
            ("topk", "topk"),
        ):
            if marker in release.lower():
                return arch
        if any(m in release.lower() for m in ("vanilla", "standard", "panneal")):
            return "standard"
        return "config.json"  # every dict_class the converter maps gives standard, gated, jumprelu or topk
    return "cfg.json"


def status(func: str, arch: str, sae_id: str, folder: str, lookup: Any) -> tuple[str, str]:
    """(loadable, refused or cfg.json decides; why) for one directory entry."""
    why = refusal(func, folder)
    if why is not None:
        return REFUSED, why.split(",")[0]
    if arch.split(" ")[0] not in (*saelens.ARCHITECTURES, "cfg.json", "config.json"):
        return REFUSED, f"architecture {arch}"
    factors = lookup.norm_scaling_factor or {}
    if func in NEEDS_SCALE and sae_id not in factors:
        return REFUSED, "normalize_activations without a norm_scaling_factor in the directory"
    if func != "sae_lens":
        return LOADABLE, ""
    refused = ", ".join(saelens.REFUSED_ARCHITECTURES)
    override = (lookup.config_overrides or {}).get("normalize_activations")
    if sae_id in factors or override in NO_FACTOR_NEEDED:
        return UNKNOWN, f"its architecture (refused: {refused})"
    return UNKNOWN, (
        f"its architecture (refused: {refused}) and normalize_activations "
        "(refused: expected_average_only_in, as the directory records no factor)"
    )


def main() -> None:
    import sae_lens
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    counts: Counter[tuple[str, str, str, str]] = Counter()
    for release, lookup in get_pretrained_saes_directory().items():
        func = lookup.conversion_func or "sae_lens"
        for sae_id, folder in lookup.saes_map.items():
            arch = architecture(func, release, folder)
            counts[(func, arch, *status(func, arch, sae_id, folder, lookup))] += 1
    total = sum(counts.values())
    by = Counter()
    for (_, _, state, _), n in counts.items():
        by[state] += n
    print(
        f"SAELens {sae_lens.__version__}: {by[LOADABLE]} of {total} SAEs loadable ({100 * by[LOADABLE] / total:.1f}%), "
        f"{by[UNKNOWN]} as their cfg.json says, {by[REFUSED]} refused\n"
    )
    print(f"| conversion function | architecture | SAEs | {LOADABLE} | {REFUSED} | {UNKNOWN} | why |")
    print("|---|---|---:|---:|---:|---:|---|")
    for (func, arch, state, why), n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        cells = " | ".join(str(n if state == s else 0) for s in (LOADABLE, REFUSED, UNKNOWN))
        print(f"| {func} | {arch} | {n} | {cells} | {why} |")


if __name__ == "__main__":
    main()
