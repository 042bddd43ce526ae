"""Instruction conversations: the task templates, and a conversation turned into LM tokens with the loss
on the assistant's tokens only.

A conversation is a list of messages `{"role": "user" | "assistant", "content": str}` as Hugging Face chat
templates take them; the first user message starts with `<image>`. It is rendered with the LM tokenizer's
chat template when it has one, otherwise with the plain format:

    {bos}USER: <image>
    {instruction}
    ASSISTANT: {answer}{eos}
    USER: {instruction}
    ASSISTANT: {answer}{eos}

The loss covers each answer and its end token (` {answer}{eos}`); everything else, the `<image>` tokens
included, has label -100. `<image>` is expanded to one token per image embedding of the model.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from data_pipeline.errors import DataError
from data_pipeline.text import clean_caption

IMAGE_TOKEN = "<image>"  # the same string as pretrain.model.multimodal_lm.IMAGE_TOKEN (no import: layering)
IGNORE = -100

# Captioning phrasings. Training draws from TRAIN; HELD_OUT never appears in a training set and measures how
# well instruction following generalises to unseen phrasings (T0 / FLAN).
CAPTION_TEMPLATES = {
    "train": (
        "Describe the image briefly.",
        "What is in this picture?",
        "Write a short caption for this image.",
        "What does this image show?",
        "Give a one-sentence description of the picture.",
        "Caption this image.",
    ),
    "held_out": (
        "Summarize the picture in one sentence.",
        "Tell me what you see in this image.",
        "Provide a brief description of the scene.",
    ),
}
FOLLOW_UPS = ("Describe it in other words.", "Say that differently.", "Can you rephrase that?")


class InstructionError(DataError):
    """A conversation or instruction set that cannot train an instruction-following model."""


def caption_conversation(captions: list[str], instruction: str, follow_up: str | None = None) -> list[dict]:
    """One image's captioning conversation; with `follow_up`, a second turn answered by another caption."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"},
                {"role": "assistant", "content": captions[0]}]
    if follow_up and len(captions) > 1:
        messages += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": captions[1]}]
    return messages


def sample_caption_conversation(captions: list[str], templates: tuple[str, ...], rng: random.Random,
                                multi_turn: float) -> tuple[list[dict], str]:
    """A conversation with a random template and caption order; returns it and the template used.

    The template takes one draw whatever their number, so sets made with one template and with several
    hold the same captions and turns (the T0/FLAN comparison's same data)."""
    captions = rng.sample(captions, len(captions))
    template = templates[int(rng.random() * len(templates))]
    follow_up = rng.choice(FOLLOW_UPS) if rng.random() < multi_turn else None
    return caption_conversation(captions, template, follow_up), template


def vqa_conversation(question: str, answers: list[str]) -> tuple[list[dict], str]:
    """A VQA question as an instruction (the question itself) answered by its commonest annotator answer (the
    first of equally common ones); returns the conversation and that answer."""
    answer = Counter(answers).most_common(1)[0][0]
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}, {"role": "assistant", "content": answer}], answer


def has_assistant_turn(messages: list[dict]) -> bool:
    return any(m.get("role") == "assistant" and m.get("content") for m in messages)


def first_instruction(messages: list[dict]) -> str:
    """The first user turn without `<image>`, cleaned as the pretraining captions were: what a model that fuses
    the instruction with the image reads (at generation the first answer's prompt holds only that turn); "" when
    no user speaks (the image is fused with no text)."""
    first = next((m["content"] for m in messages if m.get("role") == "user"), "")
    return clean_caption(first.replace(IMAGE_TOKEN, " "))


def render_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The conversation as text pieces (text, trained?) whose concatenation is the rendered conversation."""
    if not has_assistant_turn(messages):
        raise InstructionError("the conversation has no assistant turn, so nothing would be trained: every "
                               "conversation needs at least one {'role': 'assistant', 'content': ...} message")
    if tokenizer.chat_template:
        return _chat_template_segments(messages, tokenizer)
    return _plain_segments(messages, tokenizer)


def _plain_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    segments, pending = [], tokenizer.bos_token or ""
    for message in messages:
        if message["role"] == "assistant":
            segments += [(pending + "ASSISTANT:", False), (f" {message['content']}{tokenizer.eos_token}", True)]
            pending = "\n"
        else:
            pending += f"USER: {message['content']}\n"
    return segments


def _chat_template_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Each answer is what rendering one more message adds after the generation prompt."""
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise InstructionError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                   "continuation, so the answer tokens cannot be found; remove chat_template to "
                                   "use the plain format")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def prompt_text(messages: list[dict], tokenizer) -> str:
    """The conversation so far (ending with a user message) plus the cue for the assistant's answer."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = _plain_segments([*messages, {"role": "assistant", "content": ""}], tokenizer)[0][0]
    return prompt


def image_token_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise InstructionError(f"the tokenizer has no {IMAGE_TOKEN} token: add it as a special token "
                               "(MultimodalLM.build does) and save the tokenizer with the model")
    return token_id


def expand_image(ids: list[int], image_id: int, image_tokens: int) -> list[int]:
    return [t for i in ids for t in ([i] * image_tokens if i == image_id else [i])]


def tokenize_conversation(messages: list[dict], tokenizer, image_tokens: int, max_len: int) -> dict | None:
    """input_ids, attention_mask and labels (-100 except on answer tokens), padded to max_len.

    None when the conversation is longer than max_len (truncating would cut an answer or the image)."""
    image_id = image_token_id(tokenizer)
    ids, labels = [], []
    for text, trained in render_segments(messages, tokenizer):
        piece = expand_image(tokenizer(text, add_special_tokens=False)["input_ids"], image_id, image_tokens)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if len(ids) > max_len:
        return None
    padding = max_len - len(ids)
    return {
        "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * padding),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * padding),
        "labels": torch.tensor(labels + [IGNORE] * padding),
    }


def tokenize_prompt(messages: list[dict], tokenizer, image_tokens: int) -> list[int]:
    """The generation prompt's ids with `<image>` expanded."""
    ids = tokenizer(prompt_text(messages, tokenizer), add_special_tokens=False)["input_ids"]
    return expand_image(ids, image_token_id(tokenizer), image_tokens)


def check_instruction_set(paths: list[str], peek: int = 16) -> None:
    """An instruction set whose first samples carry no assistant turn trains nothing: one error up front.

    (The loader still skips, and counts, any later sample without one.)"""
    import json

    from data_pipeline.samples import read_samples

    seen = 0
    for raw in read_samples(paths[:1], Counter()):
        try:
            messages = json.loads(raw.get("json", b"{}").decode("utf-8")).get("conversations") or []
        except (ValueError, AttributeError):
            messages = []
        if has_assistant_turn(messages):
            return
        seen += 1
        if seen >= peek:
            break
    raise InstructionError(f"{paths[0]}: none of its first {seen} samples has a conversation with an assistant turn, "
                           "so nothing would be trained; build the set with python -m data_pipeline.make_instructions")
