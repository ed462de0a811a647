"""Files an onnxruntime-genai model folder needs beside the model, carried over to the output folder.

onnxruntime-genai loads a folder: `genai_config.json` names the model file (`model.decoder.filename`) and the
tokenizer files sit beside it. When the input is such a folder, the output folder gets the same files, with
the config pointing at the written model, so that the generator loads it unchanged. They are moved into
place with the model (`output.save_atomically`), never half-written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sqonnx.errors import SqonnxError

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# What the model builder writes beside the model, besides the model and its data.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json",
                   "config.json")


def companion_files(model_path: Path, output_path: Path) -> dict[str, bytes]:
    """`genai_config.json` (pointing at the output) and the tokenizer files, when the input folder has a
    genai config and the output goes to another folder; else nothing."""
    config_path = model_path.parent / GENAI_CONFIG
    if not config_path.exists():
        return {}
    if output_path.parent.resolve() == model_path.parent.resolve():
        logger.warning("%s is written beside the input's %s, which keeps naming %s; write it to another "
                       "folder to get a folder onnxruntime-genai loads", output_path.name, GENAI_CONFIG,
                       model_path.name)
        return {}
    try:
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["filename"] = output_path.name
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SqonnxError(f"{config_path} is not a readable onnxruntime-genai config ({type(exc).__name__}: "
                          f"{exc}); fix it or move it away from the model") from None
    files = {GENAI_CONFIG: (json.dumps(config, indent=4) + "\n").encode()}
    for name in TOKENIZER_FILES:
        source = model_path.parent / name
        if source.is_file():
            files[name] = source.read_bytes()
    return files
