"""Tokenizers: every kind becomes a tiktoken Encoding, wrapped in a Tokenizer that knows the ids the pipeline needs
(BOS, EOS, pad, the ids that end a response) and how a chat is rendered.

    get_tokenizer('byte' | tiktoken name | Llama 3 tokenizer.model | llama2.c tok*.bin | model directory) ──► Tokenizer

Text is always encoded as plain text (encode_ordinary), so a user who types "<|eot_id|>" gets the characters, never
the control token: special tokens come only from code (BOS, EOS) or a chat template's own markup (see the end of
this file: chat templates).
"""
import base64
import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Iterable

import tiktoken

import llama2c


class TokenizerError(ValueError):
    """A bad tokenizer file; the message names the file (and the line or token)."""



LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])  # 256 in all, ids 128000..128255
PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}  # the plain chat format is HH's
# Meta's chat template for the Llama 3 Instruct models, verbatim: the "chat_template" of tokenizer_config.json in
# meta-llama/Meta-Llama-3-8B-Instruct on the Hugging Face Hub (tokenizer.model files carry no template)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class Tokenizer:
    """A tiktoken Encoding plus the ids the pipeline needs: every sequence starts with bos_id, a response ends with one
    of end_ids (EOS, or the chat template's end of turn), pads are pad_id (masked out of every loss); and the chat
    template (jinja source, or None: the plain HH format) that render applies to chat messages."""

    def __init__(self, enc: tiktoken.Encoding, bos: str | None, eos: str, pad: str | None = None, prefix: str = "",
                 chat_template: str | None = None, end: Iterable[int] = ()):
        self.enc, self.name, self.n_vocab, self.chat_template = enc, enc.name, enc.n_vocab, chat_template
        self.special_tokens = {t: enc.encode_single_token(t) for t in enc.special_tokens_set}
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = None if bos is None else self.special(bos)
        self.eos_id = self.special(eos)
        self.pad_id = self.eos_id if pad is None else self.special(pad)  # pads are never seen: masked, right-padded
        self.end_ids = list(dict.fromkeys([self.eos_id, *end]))
        self.prefix = prefix  # sentencepiece's dummy prefix: " " before the text that starts a sequence

    def encode(self, text: str) -> list[int]:
        """The text as the start of a sequence (after BOS): with the dummy prefix, if any, when text is not empty."""
        return self.enc.encode_ordinary(self.prefix + text if text else text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def special(self, token: str) -> int:
        return self.enc.encode_single_token(token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode for many texts at once (tiktoken's threads), each continuing a sequence (no dummy prefix)."""
        return self.enc.encode_ordinary_batch(texts)

    def ids(self, *segments: list) -> list[list[int]]:
        """Token ids of render's segment lists: the text in one batched call, special ids as they are."""
        texts = iter(self.encode_batch([s for seg in segments for s in seg if isinstance(s, str)]))
        return [[i for s in seg for i in (next(texts) if isinstance(s, str) else (s,))] for seg in segments]

    def render(self, prompt: str | list, responses: Iterable = ()) -> list[list]:
        """[prompt segments, segments of each response]: a segment is text (str, encoded as text) or a special id
        (int). A string prompt is raw text after BOS and a string response ends with EOS. Chat messages go through
        the chat template (see render_chat) or, without one, the plain HH format: "\n\nHuman: ..\n\nAssistant:"
        after BOS and the response " content" EOS."""
        bos = [] if self.bos_id is None else [self.bos_id]
        if isinstance(prompt, str):
            return [[*bos, self.prefix + prompt], *([r, self.eos_id] for r in responses)]
        if self.chat_template is not None:
            return render_chat(self, prompt, responses)
        return [[*bos, self.prefix + "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in prompt)
                 + "\n\nAssistant:"], *([" " + r[0]["content"], self.eos_id] for r in responses)]


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """'byte' (built in, no file), a tiktoken encoding name (gpt2, r50k_base, cl100k_base, o200k_base; their
    <|endoftext|> serves as BOS, EOS and pad), the path of a Llama 3 tokenizer.model, or a llama2.c tokenizer: its
    .bin file or a model directory holding one (llama2c_tokenizer)."""
    if name_or_path == "byte":  # 256 byte tokens and no merges: for offline demos and tests
        specials = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}
        enc = tiktoken.Encoding("byte", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                special_tokens=specials)
        return Tokenizer(enc, *specials)
    if name_or_path in tiktoken.list_encoding_names():
        try:
            enc = tiktoken.get_encoding(name_or_path)
        except Exception as e:  # tiktoken downloads its files on first use: say where they are looked for
            raise RuntimeError(f"tiktoken could not load {name_or_path!r} ({type(e).__name__}); offline, point "
                               f"TIKTOKEN_CACHE_DIR at a directory holding its files (e.g. ../shared/tiktoken_cache)")
        return Tokenizer(enc, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    path = Path(name_or_path)
    if path.suffix == ".bin" or path.is_dir():
        enc, bos, eos = llama2c.llama2c_encoding(path)
        return Tokenizer(enc, bos, eos, prefix=" ")
    if not path.is_file():
        raise ValueError(f"unknown tokenizer {name_or_path!r}: 'byte', one of {tiktoken.list_encoding_names()}, "
                         "the path of a Llama 3 tokenizer.model, or a llama2.c tokenizer .bin (or its directory)")
    ranks = {}  # tiktoken's BPE file: "<base64 token> <rank>" per line; read here, not through tiktoken's URL cache
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{line_no}: expected '<base64 token> <rank>' ({e})") from None
    special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
    enc = tiktoken.Encoding(path.name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=special)
    return Tokenizer(enc, "<|begin_of_text|>", "<|end_of_text|>", chat_template=LLAMA3_CHAT_TEMPLATE,
                     end=[special["<|eot_id|>"]])


def response_end_ids(tok) -> list[int]:
    """The ids that end a response in tokenize (generation stops on them): EOS, and the chat's end of turn."""
    return tok.end_ids


# ----------------------------------------------------------------------------------------------------------------------
# chat templates: the model's own jinja chat_template, rendered as transformers renders it, then tokenised so that only
# the template's markup can become special tokens. transformers' apply_chat_template renders the whole chat to one
# string and tokenises it with every added token recognised, so a message holding "<|im_end|>" ends its turn there;
# here message contents are always text. Method: render the chat once with each content replaced by a sentinel
# (private-use characters) to learn the markup between contents, once with the real contents; walk the real string:
# markup, content, markup, ... Markup is split at the special tokens it holds; contents are text. Text next to text
# (markup and content) is encoded in one piece, as transformers does between added tokens, so ids match it exactly
# whenever no content holds an added token's string.

SENTINEL = re.compile("\ue000([0-9]+)\ue001")  # the sentinel of message i: "\ue000{i}\ue001", stable under | trim


@functools.lru_cache(maxsize=None)
def compile_template(source: str):
    """The template as transformers compiles it (transformers/utils/chat_template_utils.py,
    _cached_compile_jinja_template): jinja2's ImmutableSandboxedEnvironment (templates come from the Hub: untrusted
    code), trim_blocks and lstrip_blocks, loop controls ({% break %}), the {% generation %} tag (it marks assistant
    text for transformers' assistant masks; here it renders its body), and the helpers templates call."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise TokenizerError("chat templates need jinja2 (an optional dependency): pip install jinja2") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise TokenizerError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox escapes), found "
                             f"{jinja2.__version__}: pip install -U jinja2")

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):  # transformers' TemplateNamespace: no _attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class Dict:  # transformers' TemplateDict: dict() and dict.fromkeys() without the type's attributes
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # jinja's own escapes HTML
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=Dict(), namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template: line {e.lineno}: {e.message}") from None


def render_template(tok: Tokenizer, messages: list, add_generation_prompt: bool) -> str:
    """The chat as transformers' apply_chat_template(tokenize=False) renders it: the same variables (the special
    token strings, tools and documents None)."""
    import jinja2  # compile_template has checked it is there
    names = {k: v for k, v in (("bos_token", tok.bos_token), ("eos_token", tok.eos_token),
                               ("pad_token", tok.pad_token), ("unk_token", getattr(tok, "unk_token", None)))
             if v is not None}
    try:
        return compile_template(tok.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          tools=None, documents=None, **names)
    except jinja2.exceptions.TemplateError as e:  # raise_exception's message, or a template bug
        raise TokenizerError(f"chat template of {tok.name}: {e.message or type(e).__name__} (roles "
                             f"{', '.join(m['role'] for m in messages)})") from None


@functools.lru_cache(maxsize=4096)
def _markup(tok: Tokenizer, key: str, add_generation_prompt: bool) -> tuple:
    """(markup, message index, markup, ..., markup) of a chat shape (its messages without their contents, as JSON):
    the template rendered with sentinel contents, split at the sentinels."""
    messages = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(json.loads(key))]
    parts = SENTINEL.split(render_template(tok, messages, add_generation_prompt))
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def _pieces(tok: Tokenizer, messages: list, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_markup) pieces, in order; a content may come out trimmed (Llama 3's | trim)."""
    shape = json.dumps([{k: v for k, v in m.items() if k != "content"} for m in messages], sort_keys=True)
    markup, text = _markup(tok, shape, add_generation_prompt), render_template(tok, messages, add_generation_prompt)
    pieces, pos = [], 0
    for k in range(0, len(markup), 2):
        if not text.startswith(markup[k], pos):
            break
        pieces.append((markup[k], True))
        pos += len(markup[k])
        if k + 1 == len(markup):
            if pos == len(text):
                return pieces
            break
        content, after = messages[markup[k + 1]]["content"], markup[k + 2]
        found = [c for c in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
                 if text.startswith(c, pos) and text.startswith(after, pos + len(c))]
        if not found:
            break
        pieces.append((found[0], False))
        pos += len(found[0])
    raise TokenizerError(f"chat template of {tok.name}: near character {pos} of the rendered chat, the template's text "
                         f"depends on a message's content in a way other than inserting it (or its trim); cannot tell "
                         f"markup from content (roles {', '.join(m['role'] for m in messages)})")


def _tokens(tok: Tokenizer, pieces: list[tuple[str, bool]]) -> list[tuple[str | int, int]]:
    """(segment, end position in the rendered text) of the pieces: markup split at the special tokens it holds (ids),
    text (markup or content) as str."""
    if not hasattr(tok, "_special_re"):  # longest first: "<|im_end|>" before a shorter token it starts with
        names = sorted(tok.special_tokens, key=len, reverse=True)
        tok._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
    out, pos = [], 0
    for text, is_markup in pieces:
        parts = tok._special_re.split(text) if is_markup and tok._special_re else [text]
        for j, part in enumerate(parts):
            pos += len(part)
            if j % 2:
                out.append((tok.special_tokens[part], pos))
            elif part and out and isinstance(out[-1][0], str):
                out[-1] = (out[-1][0] + part, pos)
            elif part:
                out.append((part, pos))
    return out


def render_chat(tok: Tokenizer, prompt: list, responses: Iterable = ()) -> list[list]:
    """[prompt segments, segments of each response] through the chat template. The prompt is the chat rendered with
    add_generation_prompt; a response (one assistant message) is what rendering prompt + response adds after that,
    up to its last end id: whitespace the template writes after the end of the turn (ChatML's "\n" after <|im_end|>)
    is left out, as generation stops at the end id; a response with no end id gets EOS. The prompt rendered alone
    must be a prefix of the whole conversation rendered."""
    pieces = _pieces(tok, prompt, True)
    head, cut = _tokens(tok, pieces), sum(len(t) for t, _ in pieces)
    segments = [s for s, _ in head]
    if segments and isinstance(segments[0], str):  # text at the very start of the sequence: the dummy prefix
        segments[0] = tok.prefix + segments[0]
    out, prompt_text = [segments], "".join(t for t, _ in pieces)
    for response in responses:
        pieces = _pieces(tok, [*prompt, *response], False)
        whole = _tokens(tok, pieces)
        first = next((i for i, (_, end) in enumerate(whole) if end > cut), len(whole))  # the first past the prompt
        begin = whole[first - 1][1] if first else 0
        if not "".join(t for t, _ in pieces).startswith(prompt_text) or (begin < cut and isinstance(whole[first][0], int)):
            raise TokenizerError(f"chat template of {tok.name}: the prompt rendered alone is not a prefix of the "
                                 f"prompt and response rendered together, so they cannot be split")
        rest = [s for s, _ in whole[first:]]
        if begin < cut:  # a text segment that starts in the prompt: its response part
            rest[0] = rest[0][cut - begin:]
        ends = [i for i, s in enumerate(rest) if isinstance(s, int) and s in tok.end_ids]
        if not ends:
            rest.append(tok.eos_id)
        elif all(isinstance(s, str) and not s.strip() for s in rest[ends[-1] + 1:]):
            del rest[ends[-1] + 1:]
        out.append(rest)
    return out
