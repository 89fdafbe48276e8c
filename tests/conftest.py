"""Make the top-level scripts importable as modules (they are scripts, not a package), then the bench/ scripts
some tests check (after the top level, so that none shadows a stage), and fixtures shared by several test files."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

from helpers import save_char_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """An untrained char-level Llama saved with its tokenizer: real transformers classes, garbage outputs."""
    return save_char_llama(tmp_path_factory.mktemp("model"), seed=0)
