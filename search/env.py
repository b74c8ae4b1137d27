"""Process environment for every evomerge process: offline, and quiet libraries.

Kept free of heavy imports: tqdm reads TQDM_DISABLE when it is first imported (torch imports it),
so this must be applied before torch, transformers or lm-eval load.
"""

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",  # our progress bar is the one shown
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def apply() -> None:
    os.environ.update(OFFLINE_ENV)
