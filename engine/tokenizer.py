"""Anvil's tokenizer: SentencePiece tokenizer.model or HF tokenizer.json, special ids, and HF-style chat templates.

Loading (`Tokenizer.from_dir`):
- `tokenizer.json` wins over `tokenizer.model` when a folder has both. That is what HF's fast tokenizer (the default
  of `AutoTokenizer`) does, so ids match what people get from transformers; the .json also carries the added tokens,
  normalizer and post-processor that the .model knows nothing about.
- `tokenizer.model` is run through the `sentencepiece` library itself, so its ids are sentencepiece's ids: the same
  as the models' reference code (Meta's / Mistral's) and as HF's SentencePiece ("slow") tokenizer with `legacy=True`.
  Special-token strings in the text (`<s>`, `</s>`, `<unk>`, control pieces, added tokens from tokenizer_config.json)
  are split out first and each piece of text between them is encoded on its own, as HF's slow tokenizer does.

Known differences from HF, each pinned by a test in tests/engine/test_tokenizer.py:
- HF's sentencepiece -> tokenizers converter (`LlamaTokenizerFast(from_slow=True)`, and in transformers 5 any
  `LlamaTokenizer` built from a .model) is not sentencepiece: (1) its Metaspace pre-tokenizer adds the dummy-prefix
  "▁" only when the text does not already start with a space, so " leading" -> ["▁leading"] where sentencepiece
  gives ["▁", "▁leading"]; (2) its BPE applies merges by rank, not sentencepiece's piece scores, so whitespace runs
  inside the text split differently ("x  # c" -> "▁x", "▁▁", "#" vs sentencepiece's "▁x", "▁", "▁#"); (3) with
  `legacy=False` the text after an in-text special token gets no dummy prefix. We follow sentencepiece on all three.
  `legacy: false` in tokenizer_config.json is therefore not honoured on the .model path (a warning is logged).
- transformers 5's `SentencePieceBackend.decode` leaves byte-fallback pieces as "<0x0A>" and strips a leading space;
  we decode with sentencepiece (bytes assembled, only the dummy prefix removed), which is what HF's fast decoder does.
- decode(skip_special_tokens=False) on the .model path renders special tokens as their text with nothing added
  around them; HF's fast decoder leaves the dummy-prefix space after them ("<s> Hello" vs our "<s>Hello").
- tokenizer.json path: `encode(add_bos=True)` prepends bos when `add_bos_token` (tokenizer_config.json, else what
  the file's post-processor does) says so; tokens a post-processor would append (an eos) are never added, since this
  is for generation. `clean_up_tokenization_spaces` is not applied (transformers 5 skips it for BPE vocabularies).
"""

from __future__ import annotations

import json
import logging
import operator
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerLoadError(ValueError):
    """A tokenizer or config file exists but cannot be read; the message names the file."""


class TokenIdError(ValueError, IndexError):
    """A token id outside the vocabulary (a ValueError; also an IndexError, as id_to_piece raised before)."""


def _token_id(value: Any) -> int:
    """value as a token id: an int or an integer scalar (numpy, 0-d torch); a bool, float, str... is refused."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        raise TypeError(f"token id {value!r}: a bool is not a token id")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"token id {value!r}: expected an int, got {type(value).__name__}") from None


def _out_of_range(i: int, path: Path, vocab_size: int) -> TokenIdError:
    return TokenIdError(f"token id {i} out of range for {path} (vocab size {vocab_size})")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path, {} when the file is absent; TokenizerLoadError naming path when it is corrupt."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """The content of a special-token entry, which HF writes as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    """An `*_token_id` config entry (int, list of ints or null) as a list."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _SentencePieceBackend:
    """tokenizer.model through the sentencepiece library, plus added tokens with ids past its vocabulary."""

    kind = "sentencepiece"

    def __init__(self, path: Path, added: dict[str, tuple[int, dict[str, Any]]], extra_special: Iterable[str]):
        import sentencepiece as spm

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such SentencePiece model file")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerLoadError(f"{path}: not a valid SentencePiece model ({e})") from e
        self.sp = sp
        self.path = path
        n = sp.get_piece_size()
        self.extra: dict[int, str] = {}  # added tokens past the sentencepiece vocabulary
        self.special: dict[str, int] = {}  # text split out before sentencepiece runs -> id
        self.strip: dict[str, tuple[bool, bool]] = {}  # token -> (lstrip, rstrip)
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                self.special[sp.id_to_piece(i)] = i
        skip = set(self.special.values())  # ids decode(skip_special_tokens=True) drops
        for content, (i, entry) in added.items():
            self.special[content] = i
            if entry.get("special", True):
                skip.add(i)
            self.strip[content] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
            if i >= n:
                self.extra[i] = content
        for content in extra_special:
            if content not in self.special and (i := self.token_to_id(content)) is not None:
                self.special[content] = i
                skip.add(i)
        self._split = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True))
                                  + ")") if self.special else None)
        self.special_ids = skip

    @property
    def vocab_size(self) -> int:
        return max([self.sp.get_piece_size(), *(i + 1 for i in self.extra)])

    def token_to_id(self, token: str) -> int | None:
        for i, content in self.extra.items():
            if content == token:
                return i
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_piece(self, i: int) -> str:
        if i in self.extra:
            return self.extra[i]
        if not 0 <= i < self.sp.get_piece_size():
            raise _out_of_range(i, self.path, self.vocab_size)
        return self.sp.id_to_piece(i)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special or self._split is None:
            return self.sp.encode(text)
        parts = self._split.split(text)  # odd indices are special tokens
        for k in range(1, len(parts), 2):
            lstrip, rstrip = self.strip.get(parts[k], (False, False))
            if lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids or i in self.extra:  # rendered as its text, or dropped when special
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not (skip_special_tokens and i in self.special_ids):
                    out.append(self.id_to_piece(i))
            else:
                self.id_to_piece(i)  # range check
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def default_ids(self) -> dict[str, int | None]:
        def ok(i: int) -> int | None:
            return i if i >= 0 else None

        return {"bos": ok(self.sp.bos_id()), "eos": ok(self.sp.eos_id()), "pad": ok(self.sp.pad_id())}


class _TokenizersBackend:
    """tokenizer.json through the HF `tokenizers` library (what transformers' fast tokenizers wrap)."""

    kind = "tokenizer.json"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer.json file")
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise TokenizerLoadError(f"{path}: not a valid tokenizer.json ({e})") from e
        self.path = path
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_piece(self, i: int) -> str:
        piece = self.tok.id_to_token(i) if 0 <= i < self.vocab_size else None  # the Rust side takes a u32
        if piece is None:
            raise _out_of_range(i, self.path, self.vocab_size)
        return piece

    def encode(self, text: str, parse_special: bool) -> list[int]:
        self.tok.encode_special_tokens = not parse_special
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        for i in ids:
            self.id_to_piece(i)  # range check: the Rust decoder silently drops unknown ids
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def post_processor_adds(self, token_id: int | None) -> bool:
        """Whether the file's post-processor puts token_id first when special tokens are added."""
        if token_id is None or self.tok.post_processor is None:
            return False
        ids = self.tok.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == token_id

    def default_ids(self) -> dict[str, int | None]:
        return {"bos": None, "eos": None, "pad": None}


def _chat_env():
    """A jinja2 environment set up the way transformers' apply_chat_template sets up its own."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask markers): renders the body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _find_chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's (its "default" if a list)."""
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerLoadError(f"{jinja_path}: cannot read chat template ({e})") from e
    template = _read_json(folder / "chat_template.json").get("chat_template") or tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids for one model, with its special ids and chat template. Build with from_dir / from_file."""

    def __init__(self, backend: _SentencePieceBackend | _TokenizersBackend, *, bos_id: int | None,
                 eos_ids: set[int], pad_id: int | None, add_bos_token: bool, special_tokens: dict[str, str],
                 chat_template: str | None = None):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = set(eos_ids)
        eos_text_id = backend.token_to_id(special_tokens["eos_token"]) if "eos_token" in special_tokens else None
        # the one eos id to append where one is needed: the eos_token's, else the lowest of eos_ids
        self.eos_id = eos_text_id if eos_text_id in self.eos_ids else min(self.eos_ids, default=None)
        self.pad_id = pad_id
        self.add_bos_token = add_bos_token
        self.special_tokens = dict(special_tokens)  # bos_token/eos_token/... -> text, the chat template's context
        self.chat_template = chat_template
        self.kind = backend.kind  # "sentencepiece" or "tokenizer.json"
        self.path = backend.path
        self._compiled = None

    # ---- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The folder's tokenizer (tokenizer.json preferred over tokenizer.model), or None when it has neither."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a directory")
        json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
        if not json_path.is_file() and not model_path.is_file():
            return None
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        configs = [_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")]
        if json_path.is_file():
            backend: Any = _TokenizersBackend(json_path)
        else:
            backend = _SentencePieceBackend(model_path, _added_tokens(tok_cfg), _extra_special(tok_cfg, special_map))
            if tok_cfg.get("legacy") is False:
                log.warning("%s: legacy=false is not honoured for tokenizer.model; using sentencepiece's own "
                            "behaviour (HF legacy=true)", folder / "tokenizer_config.json")
        return cls._build(backend, tok_cfg, special_map, configs, _find_chat_template(folder, tok_cfg))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A bare SentencePiece .model file (or a lone tokenizer.json), with the ids the file itself declares."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such tokenizer file")
        backend: Any = _TokenizersBackend(p) if p.suffix == ".json" else _SentencePieceBackend(p, {}, ())
        return cls._build(backend, {}, {}, [], None)

    @classmethod
    def _build(cls, backend, tok_cfg: dict, special_map: dict, configs: list[dict], template: str | None):
        texts = {k: _token_text(tok_cfg.get(k)) or _token_text(special_map.get(k)) for k in SPECIAL_KEYS}
        defaults = backend.default_ids()
        for key, short in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", None), ("pad_token", "pad")):
            if texts[key] is None and short and defaults[short] is not None:
                texts[key] = backend.id_to_piece(defaults[short])
        if texts["unk_token"] is None and backend.kind == "sentencepiece":
            texts["unk_token"] = backend.id_to_piece(backend.sp.unk_id())

        def from_text(key: str) -> int | None:
            return backend.token_to_id(texts[key]) if texts[key] is not None else None

        def from_configs(key: str) -> list[int]:
            return [i for cfg in configs for i in _id_list(cfg.get(key))]

        bos_id = from_text("bos_token")
        if bos_id is None:
            bos_id = next(iter(from_configs("bos_token_id")), None)
        eos_ids = set(from_configs("eos_token_id"))
        if (eos := from_text("eos_token")) is not None:
            eos_ids.add(eos)
        pad_id = from_text("pad_token")
        if pad_id is None:
            pad_id = next(iter(from_configs("pad_token_id")), None)
        if isinstance(tok_cfg.get("add_bos_token"), bool):
            add_bos = tok_cfg["add_bos_token"]
        elif backend.kind == "sentencepiece":
            add_bos = bos_id is not None  # Llama/Mistral convention; HF's LlamaTokenizer default
        else:
            add_bos = backend.post_processor_adds(bos_id)
        special = {k: v for k, v in texts.items() if v is not None}
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, add_bos_token=add_bos,
                   special_tokens=special, chat_template=template)

    # ---- text <-> ids --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return self._backend.vocab_size

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text; bos first when add_bos and the tokenizer adds one (add_bos_token).

        parse_special: special-token text such as "<s>" in `text` becomes that token's id (as in HF, and as a
        rendered chat template needs); False encodes it as plain text (for untrusted user text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, parse_special)
        if add_bos and self.add_bos_token and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; special tokens (bos/eos/control/added special) dropped unless skip_special_tokens=False.

        An id outside 0..vocab_size-1 raises TokenIdError (a ValueError) naming it; a bool, float or other
        non-integer id raises TypeError naming it."""
        return self._backend.decode([_token_id(i) for i in ids], skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id ("▁Hello", "<0x0A>", "<s>"); TokenIdError (a ValueError and an
        IndexError) when out of range, TypeError for a bool / float / non-integer id."""
        return self._backend.id_to_piece(_token_id(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, None when absent."""
        return self._backend.token_to_id(token)

    # ---- chat ----------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for messages, rendered like transformers' `apply_chat_template(tokenize=False)`.

        The template sees messages, add_generation_prompt, tools/documents (None unless given), the special-token
        texts (bos_token, eos_token, unk_token, pad_token), raise_exception, strftime_now and any kwargs. Encode the
        result with add_bos=False: templates put bos in themselves."""
        if self.chat_template is None:
            raise ValueError(f"{self.path.parent}: this tokenizer has no chat_template")
        if self._compiled is None:
            self._compiled = _chat_env().from_string(self.chat_template)
        context = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, {self.path}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)})")


def _added_tokens(tok_cfg: dict[str, Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    """tokenizer_config.json's added_tokens_decoder as content -> (id, entry)."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for key, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
        content = _token_text(entry)
        if content is not None and str(key).isdigit():
            out[content] = (int(key), entry if isinstance(entry, dict) else {})
    return out


def _extra_special(tok_cfg: dict[str, Any], special_map: dict[str, Any]) -> list[str]:
    """Special-token texts to split out of the input: the named ones and additional_special_tokens."""
    found = [_token_text(cfg.get(k)) for cfg in (tok_cfg, special_map) for k in SPECIAL_KEYS]
    for cfg in (tok_cfg, special_map):
        found += [_token_text(t) for t in cfg.get("additional_special_tokens") or []]
    return [t for t in found if t]
