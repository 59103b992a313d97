"""How much of SAELens's pretrained directory `load_sae` reads, per conversion function and architecture.

No network: for every directory entry, the architecture is the one its
conversion function's code path gives that entry (from the release, repository
and folder names, as SAELens's converter decides), and the entry counts as
loadable when the project accepts that conversion function and architecture
(`converters.refusal`, the same check `load_sae` makes) and, for SAEs that
need an activation scaling factor, the directory records one. Prints a
Markdown table (the one in docs/formats.md).

    python benchmarks/saelens_coverage.py
"""

from __future__ import annotations

from collections import Counter

from sae_acceptance.sources.formats import saelens
from sae_acceptance.sources.formats.converters import refusal

NEEDS_SCALE = ("llama_scope", "llama_scope_r1_distill")  # normalize_activations = expected_average_only_in


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
        return "config.json"  # every dict_class it can name is read
    return "cfg.json"


def main() -> None:
    import sae_lens
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    counts: Counter[tuple[str, str, str]] = Counter()
    for release, lookup in get_pretrained_saes_directory().items():
        func = lookup.conversion_func or "sae_lens"
        for sae_id, folder in lookup.saes_map.items():
            arch = architecture(func, release, folder)
            why = refusal(func, folder)
            if why is None and arch.split(" ")[0] not in (*saelens.ARCHITECTURES, "cfg.json", "config.json"):
                why = f"architecture {arch}"
            if why is None and func in NEEDS_SCALE and sae_id not in (lookup.norm_scaling_factor or {}):
                why = "no norm_scaling_factor in the directory"
            counts[(func, arch, why.split(",")[0] if why else "")] += 1
    total = sum(counts.values())
    ok = sum(n for (_, _, why), n in counts.items() if not why)
    print(f"SAELens {sae_lens.__version__}: {ok} of {total} SAEs loadable ({100 * ok / total:.1f}%)\n")
    print("| conversion function | architecture | SAEs | loadable | refused because |")
    print("|---|---|---:|---:|---|")
    for (func, arch, why), n in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"| {func} | {arch} | {n} | {0 if why else n} | {why} |")


if __name__ == "__main__":
    main()
