"""Process environment: quiet libraries always; offline only when asked (or by construction).

Kept free of heavy imports: tqdm reads TQDM_DISABLE when it is first imported (torch imports it),
and huggingface_hub reads HF_HUB_OFFLINE when it is first imported, so these must be applied
before torch, transformers or lm-eval load.
"""

import os

QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",  # our progress bar is the one shown
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# what a search passes on to its workers: the user's own Hugging Face settings (tokens, caches,
# offline flags), never more
PASSED_ON = ("HF_", "TRANSFORMERS_", "HUGGING_FACE_")


def quiet() -> None:
    os.environ.update(QUIET_ENV)


def offline() -> None:
    """No hub access: the zoo, the demo and the tests are offline by construction; a user's own
    commands only with --offline."""
    os.environ.update(QUIET_ENV)
    os.environ.update(OFFLINE_ENV)


def passed_on() -> dict[str, str]:
    """The variables a worker inherits from the driver: quiet settings plus the user's own."""
    return {**QUIET_ENV, **{k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}}


def apply() -> None:
    """Offline and quiet (experiments on the zoo)."""
    offline()
