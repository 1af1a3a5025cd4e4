"""Tokenizers (tokenizer.json via `tokenizers`, project-trained sentencepiece) and chat template."""

from __future__ import annotations

import os

import pytest

from data_pipelines import tokenizer as tok_lib
from vrthinker_jax.rollout import chat, protocol

CFG = protocol.ProtocolConfig(
    num_candidates=16, num_initial_frames=4, max_turns=4, max_frames_per_call=6, memory_window=20
)

# Qwen2.5-VL's chat template (the `chat_template` of its processor / tokenizer config, as
# published with the model and copied in many public repositories). Used as the reference.
QWEN25VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    lines = [CFG.system_prompt, protocol.TOOL_RESPONSE_OK, protocol.LAST_TURN_NOTE]
    colours = ["red", "green", "blue", "yellow"]
    shapes = ["square", "circle", "triangle"]
    dirs = ["left", "right", "up", "down"]
    for i in range(300):
        prompt = f"a {colours[i % 4]} {shapes[i % 3]} moves {dirs[(i // 3) % 4]}"
        segs = protocol.prompt_segments(prompt, CFG)
        lines += [s.text for s in segs if isinstance(s, protocol.Text)]
        judg = {k: (i + j) % 3 for j, k in enumerate(protocol.LABEL_KEYS)}
        lines.append(protocol.format_tool_turn(
            f"Frames {i % 16 + 1} and {i % 16 + 17} look alike.", "I scan more frames.", judg,
            [4 + i % 3, 20 + i % 3]))
        lines.append(protocol.format_final_turn("Video 2 is noisy.", "Video 1 wins.", judg))
    return lines


TEXTS = [
    "Prompt: a red square moves right\nVideo 1:",
    "<|im_start|>user\nFrame 3: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n",
    '<tool_call>{"name": "select_frames", "arguments": {"target_frames": [4, 5, 20]}}</tool_call>',
    "  leading and  double  spaces, tabs\tand trailing  ",
    "unicode: é ü 中文 🙂 \\boxed{1}",
    "glued<|im_end|><|im_start|>special<|endoftext|>tokens",
]


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    path = tok_lib.train_sentencepiece(_corpus(), str(d), vocab_size=600)
    return tok_lib.load_tokenizer(path)


def write_bpe_tokenizer(path: str, corpus: list[str], vocab_size: int) -> str:
    """Trains a byte-level BPE tokenizer.json (Qwen's special tokens first) on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(tok_lib.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    write_bpe_tokenizer(str(d / "tokenizer.json"), _corpus(), 500)
    return tok_lib.load_tokenizer(str(d))  # a directory holding tokenizer.json


@pytest.fixture(params=["spm", "hf"])
def tok(request, spm_tok, hf_tok):
    return spm_tok if request.param == "spm" else hf_tok


def test_load_picks_backend(spm_tok, hf_tok):
    assert isinstance(spm_tok, tok_lib.SentencePieceTokenizer)
    assert isinstance(hf_tok, tok_lib.HFTokenizer)
    assert spm_tok.vocab_size == 600
    assert hf_tok.vocab_size == 500


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_single_ids(tok):
    tok.check_special_tokens()
    ids = [tok.token_to_id(t) for t in tok_lib.SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    for t, tid in zip(tok_lib.SPECIAL_TOKENS, ids, strict=True):
        assert tok.id_to_token(tid) == t
        # never split, whatever surrounds it
        for text in (f"x{t}y", f" {t} ", f"{t}{t}", f"\n{t}\n"):
            enc = tok.encode(text)
            assert enc.count(tid) == text.count(t)
            assert tok.decode(enc) == text
    # a frame placeholder in the middle of text keeps its ids
    enc = tok.encode("Frame 3: <|vision_start|><|image_pad|><|vision_end|>")
    vt = chat.VisionTokens.from_tokenizer(tok)
    assert enc[-3:] == [vt.start, vt.pad, vt.end]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("<|no_such_token|>")


def test_tokenize_protocol_conversation(tok):
    segs = protocol.prompt_segments("a red square moves right", CFG)
    t = chat.tokenize_segments(tok, segs, tokens_per_frame=4)
    vt = chat.VisionTokens.from_tokenizer(tok)
    assert int((t.ids == vt.pad).sum()) == 4 * 2 * CFG.num_initial_frames
    text = "".join(s.text if isinstance(s, protocol.Text) else
                   "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>" for s in segs)
    assert tok.decode(t.ids.tolist()) == text


def test_load_errors(tmp_path):
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(tok_lib.TokenizerError, match="garbage.model"):
        tok_lib.load_tokenizer(str(bad))
    js = tmp_path / "tokenizer.json"
    js.write_text('{"not": "a tokenizer"}')
    with pytest.raises(tok_lib.TokenizerError, match="tokenizer.json"):
        tok_lib.load_tokenizer(str(js))
    with pytest.raises(tok_lib.TokenizerError, match="no such"):
        tok_lib.load_tokenizer(os.path.join(str(tmp_path), "missing.model"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(tok_lib.TokenizerError, match="neither"):
        tok_lib.load_tokenizer(str(empty))


def _render_reference(messages, **kw) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(QWEN25VL_TEMPLATE).render(messages=messages, **kw)


MESSAGES = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "and"},
            {"type": "video"}, {"type": "image", "image": "x.png"},
        ]},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "more"}]},
    ],
]


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("vision_id", [True, False])
def test_chat_template_matches_jinja(messages, gen, vision_id):
    ours = tok_lib.chat_template(messages, add_generation_prompt=gen, add_vision_id=vision_id)
    ref = _render_reference(messages, add_generation_prompt=gen, add_vision_id=vision_id)
    assert ours == ref


def test_chat_template_equals_protocol_prompt():
    segs = protocol.prompt_segments("a red square moves right", CFG)
    messages = tok_lib.pairwise_messages(segs)
    assert [m["role"] for m in messages] == ["system", "user"]
    images = [p for p in messages[1]["content"] if p.get("type") == "image"]
    assert len(images) == 2 * CFG.num_initial_frames
    expect = "".join(
        s.text if isinstance(s, protocol.Text) else "<|vision_start|><|image_pad|><|vision_end|>"
        for s in segs
    )
    assert tok_lib.chat_template(messages) == expect
    assert _render_reference(messages, add_generation_prompt=True) == expect
    head = f"<|im_start|>system\n{CFG.system_prompt}<|im_end|>\n<|im_start|>user\n"
    assert expect.startswith(head)
    assert expect.endswith("<|im_end|>\n<|im_start|>assistant\n")
