"""Instruction conversations: the label mask, the plain format and chat templates, make_instructions' shards."""

import json

import pytest
import torch
import webdataset as wds

from data_pipeline import resolve_shards
from data_pipeline.instructions import (
    CAPTION_TEMPLATES,
    IGNORE,
    IMAGE_TOKEN,
    InstructionError,
    caption_conversation,
    check_instruction_set,
    first_instruction,
    tokenize_conversation,
    tokenize_prompt,
    vqa_conversation,
)
from data_pipeline.lm_tokenizer import train_lm_tokenizer
from data_pipeline.make_instructions import main as make_instructions
from tests.helpers.multimodal import TEXTS

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def lm_tokenizer():
    return train_lm_tokenizer(TEXTS * 4, vocab_size=300)


def conversation():
    return caption_conversation(["A red circle.", "One circle, red."], "Describe the image briefly.", "Say it again.")


def labelled_ids(out) -> list[int]:
    return out["input_ids"][out["labels"] != IGNORE].tolist()


def test_plain_format_labels_exactly_the_assistant_tokens(lm_tokenizer):
    tok = lm_tokenizer
    out = tokenize_conversation(conversation(), tok, image_tokens=5, max_len=96)
    answers = [tok(f" {a}{tok.eos_token}", add_special_tokens=False)["input_ids"]
               for a in ("A red circle.", "One circle, red.")]
    assert labelled_ids(out) == answers[0] + answers[1]
    real = int(out["attention_mask"].sum())
    text = tok.decode(out["input_ids"][:real].tolist())
    assert text == (f"<s>USER: {IMAGE_TOKEN * 5}\nDescribe the image briefly.\nASSISTANT: A red circle.</s>\n"
                    "USER: Say it again.\nASSISTANT: One circle, red.</s>")
    # the labelled tokens are contiguous runs ending in </s>, and labels equal the ids where set
    labelled = (out["labels"] != IGNORE).nonzero().flatten().tolist()
    assert out["input_ids"][labelled[-1]] == tok.eos_token_id and (out["labels"][real:] == IGNORE).all()
    image = out["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image.sum() == 5 and (out["labels"][image] == IGNORE).all()


def test_chat_template_labels_exactly_the_assistant_tokens():
    tok = train_lm_tokenizer(TEXTS * 4, vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    out = tokenize_conversation(conversation(), tok, image_tokens=2, max_len=256)
    answers = [tok(f"{a}</s>\n", add_special_tokens=False)["input_ids"] for a in ("A red circle.", "One circle, red.")]
    assert labelled_ids(out) == answers[0] + answers[1]
    prompt = tokenize_prompt(conversation()[:1], tok, image_tokens=2)
    assert tok.decode(prompt).endswith("Describe the image briefly.</s>\n<s>assistant\n")
    assert out["input_ids"][: len(prompt)].tolist() == prompt


def test_a_conversation_without_assistant_turns_is_one_error(lm_tokenizer):
    with pytest.raises(InstructionError, match="the conversation has no assistant turn"):
        tokenize_conversation(conversation()[:1], lm_tokenizer, image_tokens=1, max_len=64)


def test_the_loader_skips_a_sample_without_an_answer_instead_of_stopping_the_run(lm_tokenizer):
    from pretrain.instruct.task import conversation_targets

    def targets(messages):
        return conversation_targets({"conversations": messages}, tokenizer=lm_tokenizer, image_tokens=1, max_len=96)

    empty_answer = [conversation()[0], {"role": "assistant", "content": ""}]
    assert targets(empty_answer) is None and targets(conversation()[:1]) is None and targets([]) is None
    assert labelled_ids(targets(conversation()))  # a conversation with answers is trained


def test_a_conversation_longer_than_max_len_is_skipped(lm_tokenizer):
    assert tokenize_conversation(conversation(), lm_tokenizer, image_tokens=5, max_len=20) is None


def test_make_instructions_writes_held_out_templates_only_to_val(synthetic_shards, tmp_path):
    captions = synthetic_shards["train"].parent
    assert make_instructions(["--captions", str(captions), "--out", str(tmp_path), "--quiet", "--min-shards", "4"]) == 0
    seen, held_out = set(CAPTION_TEMPLATES["train"]), set(CAPTION_TEMPLATES["held_out"])
    listed_held_out = {"train": [], "val": list(CAPTION_TEMPLATES["held_out"])}
    for split in ("train", "val"):
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        source = json.loads((captions / split / "manifest.json").read_text())
        assert manifest["num_samples"] == source["num_samples"] == resolve_shards(str(tmp_path / split)).num_samples
        assert manifest["options"]["held_out_templates"] == listed_held_out[split]
        used = {True: set(), False: set()}
        for shard in manifest["shards"]:
            for sample in wds.tariterators.tarfile_samples([{"url": str(tmp_path / split / shard["name"])}]):
                meta = json.loads(sample["json"])
                assert set(sample) >= {"jpg", "txt", "json"} and meta["held_out"] == (meta["template"] in held_out)
                assert meta["conversations"][0]["content"].startswith(IMAGE_TOKEN)
                assert meta["conversations"][1]["content"] in meta["captions"]
                used[meta["held_out"]].add(meta["template"])
        # train never sees a held-out phrasing; val asks with both kinds, several of each
        assert used[False] <= seen and len(used[False]) > 1
        assert not used[True] if split == "train" else len(used[True]) > 1
        assert manifest["num_shards"] == 4  # 40 and 12 samples cut to fill --min-shards, as make shards does
        check_instruction_set([str(tmp_path / split / manifest["shards"][0]["name"])])


def test_single_template_set_and_a_set_without_assistant_turns(synthetic_shards, tmp_path):
    captions = synthetic_shards["train"].parent
    make_instructions(["--captions", str(captions), "--out", str(tmp_path), "--splits", "train", "--quiet",
                       "--train-templates", "1"])
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["options"]["templates"] == [CAPTION_TEMPLATES["train"][0]]
    bad = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad)) as writer:
        writer.write({"__key__": "a", "jpg": b"x", "json": json.dumps(
            {"conversations": [{"role": "user", "content": "<image>\nhi"}]}).encode()})
    with pytest.raises(InstructionError, match="none of its first 1 samples has a conversation with an assistant"):
        check_instruction_set([str(bad)])


def read_split(directory) -> list[dict]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return [json.loads(sample["json"]) for shard in manifest["shards"]
            for sample in wds.tariterators.tarfile_samples([{"url": str(directory / shard["name"])}])]


def test_vqa_questions_become_conversations_answered_by_the_commonest_answer(synthetic_shards, vqa_shards, tmp_path):
    assert make_instructions(["--captions", str(synthetic_shards["train"].parent), "--vqa",
                              str(vqa_shards["train"].parent), "--out", str(tmp_path), "--quiet"]) == 0
    for split in ("train", "val"):
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        questions = resolve_shards(str(vqa_shards[split])).num_samples
        assert manifest["tasks"] == {"caption": resolve_shards(str(synthetic_shards[split])).num_samples,
                                     "vqa": questions}
        vqa = [m for m in read_split(tmp_path / split) if m["task"] == "vqa"]
        assert len(vqa) == questions and {m["question_type"] for m in vqa} == {"color", "shape", "count",
                                                                             "background", "presence"}
        for meta in vqa:
            user, assistant = meta["conversations"]
            assert user["content"] == f"{IMAGE_TOKEN}\n{meta['question']}" and not meta["held_out"]
            assert assistant["content"] == meta["answer"] == max(set(meta["answers"]), key=meta["answers"].count)
    assert vqa_conversation("q?", ["2", "3", "3", "2"])[1] == "2"  # equally common: the first given


def test_one_template_and_many_templates_sets_hold_the_same_captions_and_turns(synthetic_shards, tmp_path):
    captions = str(synthetic_shards["train"].parent)
    sets = {}
    for n in (1, 0):
        make_instructions(["--captions", captions, "--out", str(tmp_path / str(n)), "--splits", "train", "--quiet",
                           "--train-templates", str(n)])
        sets[n] = read_split(tmp_path / str(n) / "train")
    assert {m["template"] for m in sets[1]} == {CAPTION_TEMPLATES["train"][0]}
    assert len({m["template"] for m in sets[0]}) > 1
    strip = [[[t["content"] for t in m["conversations"][1:]] for m in sets[n]] for n in (1, 0)]
    assert strip[0] == strip[1]  # everything but the first instruction is the same, sample for sample


def test_a_fused_model_reads_the_first_instruction_cleaned_in_the_pretraining_tokenizer(lm_tokenizer, tokenizer):
    from pretrain.instruct.task import conversation_targets

    out = conversation_targets({"conversations": conversation()}, tokenizer=lm_tokenizer, image_tokens=1, max_len=96,
                               question=(tokenizer, 32))
    plain = conversation_targets({"conversations": conversation()}, tokenizer=lm_tokenizer, image_tokens=1, max_len=96)
    assert all(torch.equal(out[k], plain[k]) for k in plain)  # the LM's side is unchanged
    real = out["question_mask"].bool()
    assert out["question_ids"].shape == out["question_mask"].shape == (32,) and 3 < real.sum() < 32
    # the follow-up ("Say it again.") is not read: at generation the first answer's prompt holds one turn
    assert out["question_ids"][real].tolist() == tokenizer("describe the image briefly")["input_ids"]
    assert out["question_ids"][~real].eq(tokenizer.pad_token_id).all()
    assert first_instruction([{"role": "assistant", "content": "A red circle."}]) == ""  # no user: no text fused
