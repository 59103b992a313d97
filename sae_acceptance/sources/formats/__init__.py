"""SAE formats on disk, one module each, every one mapped onto `sources.sae.SAE`.

`layouts` tells a directory's format from the files in it; `converters` runs
SAELens's own loader functions for its pretrained releases.
"""
