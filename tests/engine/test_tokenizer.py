"""Tests for engine/tokenizer.py: ids identical to sentencepiece / HF transformers, tokenizer.json, chat templates, errors.

The Mistral-vocabulary tests need mistral_common (it ships tokenizer.model.v1) and skip without it; the
tokenizer.json tests do not. The models/tiny tests (HF AutoTokenizer, committed golden ids, id checks) are in
test_tokenizer_tiny.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer, TokenizerLoadError

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")


def _mistral_model() -> Path | None:
    """Mistral-7B's SentencePiece vocabulary (32000 pieces, byte fallback), shipped inside mistral_common."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


MODEL = _mistral_model()


def _model() -> Path:
    """The Mistral .model file; skips the test that needs it when mistral_common is not installed."""
    if MODEL is None:
        pytest.skip("mistral_common (ships tokenizer.model.v1) is not installed")
    return MODEL


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# Plain text: no special-token strings in it.
TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "日本語のテキスト", "中文测试，标点。", "한국어", "café naïve résumé Ångström", "e\u0301", "İstanbul ß ﬁ",
    "שלום עולם", "مرحبا بالعالم", "😀 👍🏽 👨\u200d👩\u200d👧 🇫🇷", "a  b   c    d", " leading space", "  two leading",
    "trailing space ", "line1\nline2\r\nline3", "\ttab\tsep", "", " ", "   ", "\n", "\n\n\n", "12345 3.14159 1,000,000",
    "0x1F 1e-9 2024-11-25", "\u00a0nbsp\u200bzwsp", "a" * 50, "MiXeD CaSe, punctuation!? (yes) [no] {maybe}",
]
# Text with special-token strings in it (split out as HF does).
SPECIAL_TEXTS = ["<s>hi</s>", "a <s> b", "x</s>y", "<unk>", "[INST] hi [/INST]", "<s>[INST] q [/INST] a</s>"]

# Where HF's sentencepiece -> tokenizers converter (the fast tokenizer, legacy=True) differs from sentencepiece, which
# Anvil follows: text -> (Anvil/sentencepiece ids, HF fast ids), both with bos. Leading whitespace: the converter adds
# the dummy "▁" only when the text does not already start with one; whitespace runs inside text: merges by rank, not
# by piece score ("▁", "▁b" vs "▁▁", "b").
FAST_DIFFERS = {
    "def add(a, b):\n    return a + b  # sum\n": (
        [1, 801, 967, 28732, 28708, 28725, 287, 1329, 13, 2287, 604, 264, 648, 287, 28705, 422, 2648, 13],
        [1, 801, 967, 28732, 28708, 28725, 287, 1329, 13, 260, 807, 264, 648, 287, 259, 28771, 2648, 13]),
    "a  b   c    d": ([1, 264, 28705, 287, 259, 277, 2287, 281], [1, 264, 259, 28726, 259, 277, 260, 28715]),
    " leading space": ([1, 28705, 5374, 2764], [1, 5374, 2764]),
    "  two leading": ([1, 259, 989, 5374], [1, 259, 10861, 5374]),
    " ": ([1, 259], [1, 28705]),
    "   ": ([1, 260], [1, 2287]),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(_model())


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(_model()))


def _hf_slow(**kwargs):
    """HF's SentencePiece-backed ("slow") tokenizer, legacy=True, built offline from the .model file."""
    if TRANSFORMERS_5:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

        return SentencePieceBackend(vocab_file=str(_model()), legacy=True, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>", **kwargs)
    return transformers.LlamaTokenizer(vocab_file=str(_model()), legacy=True, **kwargs)


@pytest.fixture(scope="module")
def hf_slow():
    return _hf_slow()


def _sp_dir(folder: Path, tok_config: dict | None = None, **files: dict) -> Path:
    """A model folder with Mistral's tokenizer.model, a tokenizer_config.json and any other JSON files."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_model(), folder / "tokenizer.model")
    cfg = {"add_bos_token": True, "add_eos_token": False, "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", **(tok_config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def hf_fast(tmp_path_factory):
    """HF's fast tokenizer converted from the .model (legacy=True). The converter needs protobuf."""
    pytest.importorskip("google.protobuf", reason="transformers' sentencepiece->tokenizers converter needs protobuf")
    folder = _sp_dir(tmp_path_factory.mktemp("hf_fast"))
    return transformers.LlamaTokenizerFast.from_pretrained(str(folder), legacy=True, from_slow=True)


# ---- SentencePiece path: ids ---------------------------------------------------------------------------------------
def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, {2}, 2, None, 32000)
    assert tok.kind == "sentencepiece" and tok.add_bos_token
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 13)] == ["<unk>", "<s>", "</s>", "<0x0A>"]
    assert tok.token_to_id("▁Hello") == 22557 and tok.token_to_id("no-such-piece") is None
    with pytest.raises(IndexError):
        tok.id_to_piece(32000)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece(tok, sp, text):
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.encode(text, add_bos=False) == sp.encode(text)


@pytest.mark.parametrize("text", TEXTS + SPECIAL_TEXTS)
def test_encode_matches_hf_slow(tok, hf_slow, text):
    assert tok.encode(text) == [1, *hf_slow.encode(text, add_special_tokens=False)]


def test_special_token_text_is_split_like_hf(tok, sp):
    assert tok.encode("<s>hi</s>") == [1, 1, 12014, 2]
    assert tok.encode("a <s> b", add_bos=False) == [*sp.encode("a "), 1, *sp.encode(" b")]
    assert tok.encode("<unk>", add_bos=False) == [0]
    # parse_special=False: the text is plain text, as sentencepiece itself sees it.
    assert tok.encode("<s>hi</s>", add_bos=False, parse_special=False) == sp.encode("<s>hi</s>")


@pytest.mark.parametrize("text", [t for t in TEXTS if t not in FAST_DIFFERS])
def test_encode_matches_hf_fast_where_converter_agrees(tok, hf_fast, text):
    assert tok.encode(text) == hf_fast.encode(text)


@pytest.mark.parametrize("text", sorted(FAST_DIFFERS))
def test_hf_fast_converter_differs_on_whitespace(tok, sp, hf_fast, text):
    ours, fast = FAST_DIFFERS[text]
    assert tok.encode(text) == ours == [1, *sp.encode(text)]
    assert hf_fast.encode(text) == fast


def test_hf_fast_non_legacy_drops_prefix_after_special(tok, tmp_path):
    """HF legacy=False: no dummy "▁" after an in-text special token; sentencepiece (and Anvil) add one."""
    pytest.importorskip("google.protobuf", reason="transformers' sentencepiece->tokenizers converter needs protobuf")
    folder = _sp_dir(tmp_path / "m", {"legacy": False})
    hf = transformers.LlamaTokenizerFast.from_pretrained(str(folder), legacy=False, from_slow=True)
    assert hf.encode("<s>hi</s>") == [1, 1, 5365, 2]  # "hi"
    assert tok.encode("<s>hi</s>") == [1, 1, 12014, 2]  # "▁hi"
    assert Tokenizer.from_dir(folder).encode("<s>hi</s>") == [1, 1, 12014, 2]


# ---- SentencePiece path: decode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_and_matches_sentencepiece(tok, sp, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf_fast(tok, hf_fast, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == hf_fast.decode(ids, skip_special_tokens=True)


def test_decode_differs_from_transformers5_slow_decode(tok, hf_slow):
    """transformers 5's SentencePieceBackend.decode keeps byte pieces as text and strips a leading space."""
    if not TRANSFORMERS_5:
        pytest.skip("transformers 4's slow LlamaTokenizer decodes byte pieces")
    assert tok.decode(tok.encode("x\ny")) == "x\ny"
    assert hf_slow.decode(tok.encode("x\ny"), skip_special_tokens=True) == "x<0x0A>y"
    assert tok.decode(tok.encode(" lead")) == " lead"
    assert hf_slow.decode(tok.encode(" lead"), skip_special_tokens=True) == "lead"


def test_decode_special_tokens(tok):
    ids = tok.encode("<s>[INST] q [/INST] a</s>")
    assert tok.decode(ids) == "[INST] q [/INST] a"
    assert tok.decode(ids, skip_special_tokens=False) == "<s><s>[INST] q [/INST] a</s>"
    assert tok.decode([]) == ""
    with pytest.raises(IndexError):
        tok.decode([1, 40000])


# ---- folders: config files, added tokens, precedence -----------------------------------------------------------
def test_from_dir_reads_config_files(tmp_path):
    folder = _sp_dir(tmp_path / "m", {"pad_token": "<unk>"}, generation_config={"bos_token_id": 1, "eos_token_id": [2, 7]},
                     config={"eos_token_id": 2, "vocab_size": 32000})
    t = Tokenizer.from_dir(folder)
    assert (t.bos_id, t.eos_ids, t.eos_id, t.pad_id, t.chat_template) == (1, {2, 7}, 2, 0, None)
    no_bos = Tokenizer.from_dir(_sp_dir(tmp_path / "n", {"add_bos_token": False}))
    assert no_bos.encode("hi") == [12014] and no_bos.bos_id == 1


def test_added_tokens_match_hf_slow(tmp_path, sp):
    entry = {"content": "<|im_end|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False}
    folder = _sp_dir(tmp_path / "m", {"added_tokens_decoder": {"32000": entry}})
    t = Tokenizer.from_dir(folder)
    hf = _hf_slow()
    hf.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    text = "hi<|im_end|> there"
    assert t.encode(text) == [1, *hf.encode(text, add_special_tokens=False)] == [1, *sp.encode("hi"), 32000,
                                                                                    *sp.encode(" there")]
    assert t.vocab_size == 32001 and t.id_to_piece(32000) == "<|im_end|>"
    assert t.decode(t.encode(text)) == "hi there"
    assert t.decode(t.encode(text), skip_special_tokens=False) == "<s>hi<|im_end|> there"


def test_added_tokens_lstrip_rstrip_match_hf_slow(tmp_path):
    entries = {"32000": {"content": "<|a|>", "lstrip": True, "rstrip": True, "special": True},
               "32001": {"content": "<|b|>", "lstrip": False, "rstrip": True, "special": True}}
    t = Tokenizer.from_dir(_sp_dir(tmp_path / "m", {"added_tokens_decoder": entries}))
    hf = _hf_slow()
    hf.add_special_tokens({"additional_special_tokens": [
        transformers.AddedToken("<|a|>", lstrip=True, rstrip=True, normalized=False, special=True),
        transformers.AddedToken("<|b|>", lstrip=False, rstrip=True, normalized=False, special=True)]})
    for text in ["x  <|a|>  y", "x <|b|>  y\n", "<|a|>\n\nz", "q\t<|b|>"]:
        assert t.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert t.encode("x  <|a|>  y", add_bos=False) == [1318, 32000, 337]


def test_non_special_added_token_survives_decode(tmp_path):
    entries = {"32000": {"content": "<tool>", "special": False}, "32001": {"content": "<|x|>", "special": True}}
    t = Tokenizer.from_dir(_sp_dir(tmp_path / "m", {"added_tokens_decoder": entries}))
    ids = t.encode("a<tool>b<|x|>")
    assert ids[-1] == 32001 and 32000 in ids
    assert t.decode(ids) == "a<tool>b"


def test_tokenizer_json_preferred_over_model(tmp_path, json_dir):
    folder = tmp_path / "both"
    shutil.copytree(json_dir, folder)
    shutil.copyfile(_model(), folder / "tokenizer.model")
    t = Tokenizer.from_dir(folder)
    assert t.kind == "tokenizer.json" and t.vocab_size == Tokenizer.from_dir(json_dir).vocab_size


# ---- tokenizer.json path ---------------------------------------------------------------------------------------
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
JSON_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE (Llama-3 style) saved as tokenizer.json + tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=JSON_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t in TEXTS if t] * 20 + ["the assistant answers the user", "def f(x):\n    return x\n"] * 50
    rust.train_from_iterator(corpus, trainer=trainer)
    bos = rust.token_to_id("<|begin_of_text|>")
    rust.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                        special_tokens=[("<|begin_of_text|>", bos)])
    folder = tmp_path_factory.mktemp("json_tok")
    rust.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "add_bos_token": True, "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_TEMPLATE,
    }))
    eos = [rust.token_to_id("<|end_of_text|>"), rust.token_to_id("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return folder


@pytest.fixture(scope="module")
def json_pair(json_dir):
    return Tokenizer.from_dir(json_dir), transformers.AutoTokenizer.from_pretrained(str(json_dir))


def test_json_special_ids(json_pair):
    t, hf = json_pair
    assert t.kind == "tokenizer.json" and t.vocab_size == len(hf)
    assert t.bos_id == hf.bos_token_id and t.add_bos_token
    assert t.eos_ids == {hf.convert_tokens_to_ids("<|end_of_text|>"), hf.eos_token_id}
    assert t.id_to_piece(t.bos_id) == "<|begin_of_text|>"


@pytest.mark.parametrize("text", TEXTS + ["<|begin_of_text|>hi<|eot_id|>", "a <|eot_id|> b"])
def test_json_encode_decode_match_hf(json_pair, text):
    t, hf = json_pair
    ids = t.encode(text)
    assert ids == hf.encode(text)
    assert t.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert t.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert t.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_json_from_file(json_dir, json_pair):
    bare = Tokenizer.from_file(json_dir / "tokenizer.json")  # no tokenizer_config.json: no named special tokens
    assert bare.kind == "tokenizer.json" and bare.bos_id is None and not bare.add_bos_token
    assert bare.encode("hello there") == json_pair[0].encode("hello there", add_bos=False)


def test_json_parse_special_false(json_pair):
    t, _ = json_pair
    assert t.encode("<|eot_id|>", add_bos=False) == [t.token_to_id("<|eot_id|>")]
    assert len(t.encode("<|eot_id|>", add_bos=False, parse_special=False)) > 1
    assert t.encode("<|eot_id|>", add_bos=False) == [t.token_to_id("<|eot_id|>")]  # flag restored


def test_json_add_bos_inferred_from_post_processor(tmp_path, json_dir):
    folder = tmp_path / "infer"
    shutil.copytree(json_dir, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(folder)
    assert t.add_bos_token and t.encode("hi")[0] == t.bos_id


# ---- chat templates ----------------------------------------------------------------------------------------------
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "  Write code:\n\tdef f(): pass  "}]


def _hf_ids(out) -> list[int]:
    return list(out if isinstance(out, list) else out["input_ids"])


def test_chat_template_json_matches_hf(json_pair):
    t, hf = json_pair
    for gen in (True, False):
        text = t.apply_chat_template(CHAT, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
    text = t.apply_chat_template(CHAT)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user") and text.endswith("assistant<|end_header_id|>\n\n")
    assert t.encode(text, add_bos=False) == _hf_ids(hf.apply_chat_template(CHAT, add_generation_prompt=True,
                                                                            tokenize=True))


def test_chat_template_sentencepiece_matches_hf(tmp_path):
    folder = _sp_dir(tmp_path / "m", {"chat_template": MISTRAL_TEMPLATE})
    t = Tokenizer.from_dir(folder)
    hf = _hf_slow(chat_template=MISTRAL_TEMPLATE)
    text = t.apply_chat_template(CHAT)
    assert text == hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[INST] Hi there [/INST]Hello! 😀</s> [INST]   Write code:\n\tdef f(): pass   [/INST]"
    assert t.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert t.encode(text, add_bos=False)[:2] == [1, 733]  # bos from the template, then "▁["


def test_chat_template_raise_exception(tmp_path):
    folder = _sp_dir(tmp_path / "m", {"chat_template": MISTRAL_TEMPLATE})
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        Tokenizer.from_dir(folder).apply_chat_template(bad)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        _hf_slow(chat_template=MISTRAL_TEMPLATE).apply_chat_template(bad, tokenize=False)


def test_chat_template_sources(tmp_path):
    folder = _sp_dir(tmp_path / "m", {"chat_template": [{"name": "tool_use", "template": "T"},
                                                         {"name": "default", "template": "D{{ eos_token }}"}]})
    assert Tokenizer.from_dir(folder).apply_chat_template(CHAT) == "D</s>"
    (folder / "chat_template.jinja").write_text("J{{ bos_token }}{% generation %}g{% endgeneration %}")
    assert Tokenizer.from_dir(folder).apply_chat_template(CHAT) == "J<s>g"
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_file(_model()).apply_chat_template(CHAT)


# ---- errors ------------------------------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        Tokenizer.from_dir(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    assert Tokenizer.from_dir(tmp_path / "empty") is None


@pytest.mark.parametrize("name,content", [("tokenizer.model", b"\x00garbage\xff" * 10), ("tokenizer.json", b"{not json"),
                                          ("tokenizer.json", b'{"model": {"type": "Nope"}}')])
def test_corrupt_tokenizer_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerLoadError, match=str(tmp_path / name)):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerLoadError, match=name):
        Tokenizer.from_file(tmp_path / name)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "config.json"])
def test_corrupt_config_file(tmp_path, name):
    folder = _sp_dir(tmp_path / "m")
    (folder / name).write_text("{broken")
    with pytest.raises(TokenizerLoadError, match=name):
        Tokenizer.from_dir(folder)
