"""Training: the TopK trainer, k grids at a hookpoint, sweep profiles and their analysis."""

from importlib import resources

from sae_acceptance.train.settings import OPTIMISERS, TrainSettings

__all__ = ["OPTIMISERS", "TrainSettings", "builtin_profiles"]


def builtin_profiles() -> tuple[str, ...]:
    """Names of the sweep profiles shipped in `profiles/`: the folder is the list."""
    folder = resources.files(__name__).joinpath("profiles")
    return tuple(sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")))
