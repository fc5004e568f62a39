"""One split of a Hugging Face Hub dataset (``hf:<dataset>[:<config>]``), offline from the local cache only, with
one-line errors: what LM distillation's texts and CoT's records both read."""
from __future__ import annotations

from ..errors import ConfigError, MissingDatasetError
from .paths import is_offline


def load_hub_split(spec: str, split: str):
    """`split` of the Hub dataset `spec` (`<dataset>[:<config>]`, without the 'hf:')."""
    import datasets

    repo, _, config = spec.partition(":")
    if not repo:
        raise ConfigError("'hf:' needs a dataset id after it, e.g. hf:openai/gsm8k:main")
    try:
        dd = datasets.load_dataset(repo, config or None)
    except Exception as e:  # offline and uncached, unknown id, missing config: datasets raises many kinds
        if is_offline():
            raise MissingDatasetError(
                f"dataset 'hf:{spec}' is not in the local Hugging Face cache and kdkit is offline "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): go online once to cache it, or export it to a "
                f"local .jsonl/.parquet file and pass its path ({type(e).__name__}: {e})") from None
        raise MissingDatasetError(f"cannot load dataset 'hf:{spec}': {type(e).__name__}: {e}") from None
    if split not in dd:
        raise ConfigError(f"dataset 'hf:{spec}' has no {split!r} split; it has {', '.join(dd)}")
    return dd[split]
