"""The tokenizer saved beside a student: an ordinary Hugging Face tokenizer, not attached to the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import StudentError
from .layout import TOKENIZER_FILES


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the student (a Hugging Face tokenizer), or a :class:`StudentError`."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise StudentError(f"student directory {path} does not exist")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise StudentError(
            f"{path} has no tokenizer (no tokenizer.json / tokenizer_config.json); copy the teacher's tokenizer "
            f"files into it, e.g. AutoTokenizer.from_pretrained(TEACHER).save_pretrained('{path}')"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any tokenizer failure has the same fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudentError(f"the tokenizer in {path} does not load ({first}); copy the teacher's tokenizer files "
                           "(tokenizer.json, tokenizer_config.json) into it again") from None
