"""Prompt design for classification: templates (`{}` marks the label word) and verbalizers (class -> label words).

Prompts are cleaned as the training captions were (lowercase, punctuation to spaces), so that a template's
full stop is not an unknown token to a tokenizer trained on cleaned captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from data_pipeline import DataError, clean_caption

# Built-in template sets. "photo": generic photo templates in CLIP's style; "plain": the label words alone.
BUILTIN_TEMPLATES = {
    "photo": ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the small {}.",
              "a photo of the large {}.", "a close-up photo of a {}."),
    "plain": ("{}",),
}  # fmt: skip


def load_templates(spec: str) -> list[str]:
    """A built-in set's name, or a file with one template per line (blank lines and '#' comments skipped)."""
    if spec in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[spec])
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"templates {spec!r} is neither a file nor a built-in set ({', '.join(BUILTIN_TEMPLATES)}); "
                        "fix --templates")
    lines = [line.strip() for line in path.read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise DataError(f"{path} holds no template; write one per line, e.g. 'a photo of a {{}}.'")
    for number, line in enumerate(lines, 1):
        if line in templates and line.count("{}") != 1:
            raise DataError(f"{path}:{number}: template {line!r} needs exactly one '{{}}' where the label word "
                            "goes; add it, e.g. 'a photo of a {}.'")
    return templates


def load_verbalizer(path: Path | None, classes: list[str]) -> dict[str, list[str]]:
    """Class -> label words from a YAML/JSON mapping (a word or a list of words per class); without a file, the
    class name with underscores as spaces. The mapping must name exactly the set's classes."""
    if path is None:
        return {name: [name.replace("_", " ")] for name in classes}
    try:
        mapping = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise DataError(f"cannot read verbalizer {path} ({err}); write a YAML/JSON mapping class -> words") from err
    if not isinstance(mapping, dict):
        raise DataError(f"verbalizer {path} is not a mapping; write 'class: [label word, ...]' per class")
    mapping = {str(name): words for name, words in mapping.items()}
    missing, unknown = [c for c in classes if c not in mapping], sorted(set(mapping) - set(classes))
    if missing or unknown:
        raise DataError(f"verbalizer {path} " + "; ".join(
            part for part in (f"misses classes {missing}" if missing else "",
                              f"names unknown classes {unknown}" if unknown else "") if part)
            + f"; give label words for exactly the classes {classes}")
    verbalizer = {}
    for name in classes:
        words = mapping[name] if isinstance(mapping[name], list) else [mapping[name]]
        words = [str(word).strip() for word in words if str(word).strip()]
        if not words:
            raise DataError(f"verbalizer {path} gives class {name!r} no label word; give it at least one")
        verbalizer[name] = words
    return verbalizer


def class_prompts(templates: list[str], verbalizer: dict[str, list[str]], classes: list[str]) -> tuple[list[str],
                                                                                                       list[int]]:
    """Every template filled with every label word of every class, cleaned, and each prompt's class index."""
    prompts, owner = [], []
    for label, name in enumerate(classes):
        for word in verbalizer[name]:
            for template in templates:
                prompts.append(clean_caption(template.replace("{}", word)))
                owner.append(label)
    return prompts, owner
