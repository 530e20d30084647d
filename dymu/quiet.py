"""Command-line quiet: transformers' info/warning logs and weight-loading progress bars go to
stderr, where the CLI promises one line for an error. Library users keep transformers' defaults;
only the command-line entry points call this."""

from __future__ import annotations

import warnings

from transformers.utils import logging as hf_logging


def quiet_libraries() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    # the legacy package calls transformers with names transformers deprecates (`past_key_values`
    # next to `cache`); those FutureWarnings carry the llava module's name: only they are dropped
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"llava(\.|$)")
