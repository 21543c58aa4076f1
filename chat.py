"""Chat templates: the model's own jinja chat_template, rendered as transformers renders it, then split into segments
so that only the template's markup can become special tokens.

    Tokenizer.render(messages, responses) ──► render_chat(tok, ...) ──► [prompt segments, segments of each response]

transformers' apply_chat_template renders the whole chat to one string and tokenises it with every added token
recognised, so a message holding "<|im_end|>" ends its turn there; here message contents are always text. Method:
render the chat once with each content replaced by a sentinel (private-use characters) to learn the markup between
contents, once with the real contents; walk the real string: markup, content, markup, ... Markup is split at the
special tokens it holds; contents are text. Text next to text (markup and content) is one segment, encoded in one
piece as transformers does between added tokens, so ids match it exactly whenever no content holds an added token's
string.

Templates are untrusted code: besides the sandbox, one rendering is bounded in loop items, characters and time
(MAX_LOOP_ITEMS, MAX_CHARS, MAX_SECONDS), and a template past a bound is refused in one line.

tok is a tokenizer.Tokenizer, read through its attributes only (name, chat_template, special_tokens, end_ids, eos_id,
bos_token / eos_token / pad_token / unk_token, prefix_every_segment, with_prefix): tokenizer.py imports this file,
never the other way round.
"""
import contextvars
import functools
import json
import math
import re
import time
from datetime import datetime
from typing import Iterable


class ChatTemplateError(ValueError):
    """A template that cannot be compiled, refuses a chat (raise_exception), or cannot be split; one line naming the
    tokenizer."""


# Meta's chat template for the Llama 3 Instruct models, verbatim: the "chat_template" of tokenizer_config.json in
# meta-llama/Meta-Llama-3-8B-Instruct on the Hugging Face Hub (tokenizer.model files carry no template)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SENTINEL = re.compile("\ue000([0-9]+)\ue001")

# Templates are untrusted code: the sandbox stops escapes, these bounds stop a template that would hang or fill memory
# (nested range(100000) loops, a string of 500 MB). Past any of them the template is refused (ChatTemplateError).
# A real chat template renders a chat in well under a millisecond, with a few hundred loop steps.
MAX_LOOP_ITEMS = 1_000_000  # items taken by every {% for %} loop of one rendering, together
MAX_CHARS = 16_000_000  # characters of the rendered chat, and of any one value a call, filter or * builds
MAX_SECONDS = 10.0  # wall-clock time of one rendering, checked at every loop item, call and piece of output


class Budget:
    """What one rendering has spent; a template past a bound raises TemplateBoundError."""

    def __init__(self):
        self.start, self.items = time.monotonic(), 0

    def check(self, items: int = 0):
        self.items += items
        if self.items > MAX_LOOP_ITEMS:
            raise TemplateBoundError(f"its loops take more than {MAX_LOOP_ITEMS} items")
        if time.monotonic() - self.start > MAX_SECONDS:
            raise TemplateBoundError(f"rendering takes more than {MAX_SECONDS:g} s")


class TemplateBoundError(Exception):
    """A template past a rendering bound (an Exception, not a jinja2 error: templates cannot catch it)."""


_budget: contextvars.ContextVar[Budget] = contextvars.ContextVar("chat_template_budget")


def _sized(value):
    """value, unless it is a string, list, tuple or dict longer than MAX_CHARS."""
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise TemplateBoundError(f"it builds a value of {len(value)} items (more than {MAX_CHARS})")
    return value


def _size_arguments(args, kwargs):
    """Refuse an integer argument past MAX_CHARS before a call builds anything from it (center(10**9), ljust, ...)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            raise TemplateBoundError(f"it passes {a} to a call or filter (more than {MAX_CHARS})")
        _sized(a)


def _grown_length(name: str, s: str, args: tuple) -> int:
    """How long a string `name` builds from s and args where it can outgrow its inputs (str.replace, join, expandtabs,
    format and %-formatting with a width), worked out before the call so that the value is never allocated; 0 for
    anything else. Every input is already at most MAX_CHARS, but their product is not."""
    if name in ("replace", "do_replace") and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        n = s.count(old) if old else len(s) + 1  # '' matches between every two characters and at both ends
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        return len(s) + n * (len(new) - len(old))
    if name in ("join", "do_join") and args and isinstance(args[0], (str, list, tuple)):
        items = args[0]
        return sum(len(x) for x in items if isinstance(x, str)) + len(s) * max(len(items) - 1, 0)
    if name == "expandtabs":
        return len(s) + s.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
    if name in ("format", "format_map", "do_format", "%"):  # a width or precision inside the format string
        return max([int(w) for w in re.findall(r"\d+", s) if len(w) > 6] or [0])
    return 0


def _check_growth(name: str, s, args: tuple):
    if isinstance(s, str) and (n := _grown_length(name, s, args)) > MAX_CHARS:
        raise TemplateBoundError(f"its {name.removeprefix('do_')} would build {n} characters (more than {MAX_CHARS})")


def bounded_loop(iterable):
    """Every {% for %} loop's iterable, wrapped by compile_template: counts the items against the budget."""
    budget = _budget.get()
    for item in iterable:
        budget.check(1)
        yield item  # the sentinel of message i: "\ue000{i}\ue001", stable under | trim


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
        raise ChatTemplateError("chat templates need jinja2 (an optional dependency): pip install jinja2") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ChatTemplateError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox escapes), found "
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
            jinja2.utils.Namespace.__setitem__(self, name, _sized(value))  # {% set ns.s = ns.s ~ ns.s %} in a loop

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

    class Bounded(jinja2.sandbox.ImmutableSandboxedEnvironment):
        """The sandbox with the rendering bounds: every loop's iterable counted (bounded_loop, put around it when the
        template is parsed), every call and filter checked for its size arguments, its result and the time, and the
        * and ** operators refused where their result would be too large."""
        intercepted_binops = frozenset({"*", "**", "%"})

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(jinja2.nodes.For):
                loop.iter = jinja2.nodes.Call(jinja2.nodes.Name("bounded_loop", "load"), [loop.iter], [], None, None)
            return tree

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            _budget.get().check()
            _size_arguments(args, kwargs)
            bound = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format: the method is inside
            _check_growth(getattr(bound, "__name__", ""), getattr(bound, "__self__", None), args)
            return _sized(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            _budget.get().check()
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                if left * len(right) > MAX_CHARS:
                    raise TemplateBoundError(f"it repeats a value of {len(right)} items {left} times")
            if operator == "%":
                _check_growth("%", left, ())
            if operator == "**" and all(isinstance(x, (int, float)) for x in (left, right)) and abs(left) > 1 and \
                    right * math.log2(abs(left)) > 4096:
                raise TemplateBoundError(f"it raises {left} to the power {right}")
            return _sized(super().call_binop(context, operator, left, right))

    def bounded_filter(f):
        skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # the context or environment, then the value filtered

        @functools.wraps(f)  # (keeps jinja_pass_arg: jinja2 passes the context as it did)
        def bounded(*args, **kwargs):
            _budget.get().check()
            _size_arguments(args[skip:], kwargs)
            value = args[skip - 1] if len(args) >= skip else None  # the value filtered: replace, join, format
            _check_growth(f.__name__, value if f.__name__ != "do_join" else (kwargs.get("d") or
                                                                            (args[skip] if len(args) > skip else "")),
                          args[skip:] if f.__name__ != "do_join" else (value,))
            return _sized(f(*args, **kwargs))
        return bounded

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=Dict(), namespace=Namespace, bounded_loop=bounded_loop)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: line {e.lineno}: {e.message}") from None


def render_template(tok, messages: list, add_generation_prompt: bool) -> str:
    """The chat as transformers' apply_chat_template(tokenize=False) renders it: the same variables (the special
    token strings, tools and documents None)."""
    try:
        template = compile_template(tok.chat_template)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{tok.name}: {e}") from None
    import jinja2  # compile_template has checked it is there
    names = {k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (v := getattr(tok, k)) is not None}
    budget = Budget()
    token = _budget.set(budget)
    try:  # piece by piece, so that the output is bounded as it grows (MAX_CHARS) and the time checked
        out, n = [], 0
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                       documents=None, **names):
            n += len(piece)
            if n > MAX_CHARS:
                raise TemplateBoundError(f"its output passes {MAX_CHARS} characters")
            budget.check()
            out.append(piece)
        return "".join(out)
    except TemplateBoundError as e:
        raise ChatTemplateError(f"chat template of {tok.name}: refused: {e} (the bounds of chat.py: loops "
                                f"{MAX_LOOP_ITEMS} items, {MAX_CHARS} characters, {MAX_SECONDS:g} s)") from None
    except RecursionError:
        raise ChatTemplateError(f"chat template of {tok.name}: refused: it recurses too deeply") from None
    except Exception as e:  # raise_exception's message, the sandbox's refusal, or a bug in the template
        why = e.message if isinstance(e, jinja2.exceptions.TemplateError) else f"{type(e).__name__}: {e}"
        raise ChatTemplateError(f"chat template of {tok.name}: {why or type(e).__name__} (roles "
                                f"{', '.join(m['role'] for m in messages)})") from None
    finally:
        _budget.reset(token)


@functools.lru_cache(maxsize=4096)
def _markup(tok, shape: tuple, add_generation_prompt: bool) -> tuple:
    """(markup, message index, markup, ..., markup) of a chat shape (its messages' items but the content): the
    template rendered with sentinel contents, split at the sentinels; each markup as (text, its parts: (text or
    the id of a special token it holds, length in characters))."""
    messages = [{**dict(items), "content": f"\ue000{i}\ue001"} for i, items in enumerate(shape)]
    parts = SENTINEL.split(render_template(tok, messages, add_generation_prompt))
    names = sorted(tok.special_tokens, key=len, reverse=True)  # longest first: a token before its prefixes
    special = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
    return tuple(int(p) if i % 2 else (p, tuple((tok.special_tokens[x] if j % 2 else x, len(x)) for j, x in
                                                enumerate(special.split(p) if special else [p]) if x))
                 for i, p in enumerate(parts))


def _pieces(tok, messages: list, add_generation_prompt: bool) -> list[tuple[str, tuple | None]]:
    """The rendered chat as pieces, in order: markup (text, its parts) and contents (text, None); a content may come
    out trimmed (Llama 3's | trim)."""
    shape = tuple(tuple((k, v) for k, v in m.items() if k != "content") for m in messages)
    try:
        markup = _markup(tok, shape, add_generation_prompt)
    except TypeError:  # an unhashable field (a list): not cached
        markup = _markup.__wrapped__(tok, shape, add_generation_prompt)
    text, pieces, pos = render_template(tok, messages, add_generation_prompt), [], 0
    for k in range(0, len(markup), 2):
        if not text.startswith(markup[k][0], pos):
            break
        pieces.append(markup[k])
        pos += len(markup[k][0])
        if k + 1 == len(markup):
            if pos == len(text):
                return pieces
            break
        content, after = messages[markup[k + 1]]["content"], markup[k + 2][0]
        found = [c for c in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip()))
                 if text.startswith(c, pos) and text.startswith(after, pos + len(c))]
        if not found:
            break
        pieces.append((found[0], None))
        pos += len(found[0])
    raise ChatTemplateError(f"chat template of {tok.name}: near character {pos} of the rendered chat, the template's "
                            f"text depends on a message's content in a way other than inserting it (or its trim); "
                            f"cannot tell markup from content (roles {', '.join(m['role'] for m in messages)})")


def _tokens(tok, pieces: list[tuple[str, tuple | None]]) -> list[tuple[str | int, int]]:
    """(segment, end position in the rendered text) of the pieces: markup's special ids, and text (markup next to
    content joined) as str."""
    out, pos = [], 0
    for text, parts in pieces:
        for part, n in parts or ((text, len(text)),):
            pos += n
            if isinstance(part, str) and out and isinstance(out[-1][0], str):
                out[-1] = (out[-1][0] + part, pos)
            else:
                out.append((part, pos))
    return out


def render_chat(tok, prompt: list, responses: Iterable = ()) -> list[list]:
    """[prompt segments, segments of each response] through the chat template. The prompt is the chat rendered with
    add_generation_prompt; a response (one assistant message) is what rendering prompt + response adds after that,
    up to its last end id: whitespace the template writes after the end of the turn (ChatML's "\\n" after <|im_end|>)
    is left out, as generation stops at the end id (anything else there is kept); a response with no end id gets
    EOS. The prompt rendered alone must be a prefix of the whole conversation rendered."""
    pieces = _pieces(tok, prompt, True)
    head, cut, prompt_text = _tokens(tok, pieces), sum(len(t) for t, _ in pieces), "".join(t for t, _ in pieces)
    out = [_prefixed(tok, [s for s, _ in head], True)]
    for response in responses:
        pieces = _pieces(tok, [*prompt, *response], False)
        whole = _tokens(tok, pieces)
        first = next((i for i, (_, end) in enumerate(whole) if end > cut), len(whole))  # the first past the prompt
        begin = whole[first - 1][1] if first else 0  # where it begins
        text = "".join(t for t, _ in pieces)
        if not text.startswith(prompt_text) or begin < cut and isinstance(whole[first][0], int):  # or a special cut
            raise ChatTemplateError(f"chat template of {tok.name}: the prompt rendered alone is not a prefix of the "
                                    f"prompt and response rendered together, so they cannot be split")
        rest = [s for s, _ in whole[first:]]
        if begin < cut:  # a text segment that starts in the prompt: its response part continues that text
            rest[0] = rest[0][cut - begin:]
        after_special = first > 0 and begin == cut and isinstance(whole[first - 1][0], int)
        rest = _prefixed(tok, rest, cut == 0 or after_special and tok.prefix_every_segment)
        ends = [i for i, s in enumerate(rest) if isinstance(s, int) and s in tok.end_ids]
        if not ends:
            rest.append(tok.eos_id)
        elif all(isinstance(s, str) and not s.strip() for s in rest[ends[-1] + 1:]):
            del rest[ends[-1] + 1:]
        out.append(rest)
    return out


def _prefixed(tok, segments: list, starts_text: bool) -> list:
    """The segments with a sentencepiece tokenizer's dummy prefix where tokenizers puts it in a rendered chat: on the
    text that starts the sequence (starts_text: the first segment does) and, for some (prefix_every_segment), on
    every text after a special token."""
    def prefixed(i: int, s) -> bool:
        return isinstance(s, str) and (starts_text if i == 0 else tok.prefix_every_segment
                                       and isinstance(segments[i - 1], int))

    return [tok.with_prefix(s) if prefixed(i, s) else s for i, s in enumerate(segments)]


def render_conversation(tok, messages: list) -> list:
    """The segments of a whole chat (no generation prompt) exactly as the template renders it: what transformers'
    apply_chat_template(messages) tokenizes, whitespace after the last end of turn included (ChatML's "\\n" after
    <|im_end|>). A reward model reads a conversation this way (transformers' and TRL's convention), where
    render_chat ends a response at its end id for generation."""
    return _prefixed(tok, [s for s, _ in _tokens(tok, _pieces(tok, messages, False))], True)
