"""Making text safe to show: secrets redacted, data text escaped for Markdown, control characters made visible.

Three kinds of output carry text we do not control (configs, datasets, model outputs, exception messages):

    redact(tree)        a config tree for config.json, report.md or W&B, without credential-like fields
    redact_text(text)   a message (error line, echoed override) with secret values replaced by `***`
    printable(text)     terminal output: escape and control characters shown as `\\x1b`, `\\u202e`, ...
    md_text(text)       Markdown (report.md): HTML and Markdown syntax shown literally, never rendered
    md_code(text)       an inline code span that the text cannot close early
    md_fence(text, ...) a fenced code block that the text cannot close early

What counts as a secret:
  - a config field whose name has a word (split at `_`, `-`, `.`, spaces and camelCase humps) starting or
    ending with token, key, secret, password, passwd, passphrase, auth or credential (`hf_token`, `api_key`,
    `auth_header`, `passphrase`, `wandbApiKey`), when its value is a non-empty string: `tokenizer`, `keypoints`,
    `author` are names of their own, and an integer `rng_key` or `pad_token_id` is not a credential;
  - the user-info part of a URL (`https://user:pass@host` -> `https://***@host`);
  - the value after `Bearer` or `Basic` (HTTP authorization headers);
  - in free text, the value of `name=value` / `name: value` where the name is secret-like, or where the value
    looks like a credential by itself (a known token prefix such as `hf_`, `ghp_`, `sk-`, or a long random
    string), so that a mistyped override `--config.hf_tokn=hf_...` is not echoed either.
Plain regular expressions rather than a library: the rules are few, and no maintained package covers config keys.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Any

MASK = "***"
_STEMS = ("token", "key", "secret", "password", "passwd", "passphrase", "auth", "credential")
# Words that start or end with a stem but name something else.
_NOT_SECRET_WORDS = frozenset(
    {
        "tokenizer",
        "tokenizers",
        "tokenize",
        "tokenized",
        "tokenization",
        "keypoint",
        "keypoints",
        "keyword",
        "keywords",
        "keyframe",
        "keyframes",
        "author",
        "authors",
        "authored",
        "monkey",
        "turkey",
        "donkey",
        "hockey",
    }
)
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^\s/@?#]+)@")
_AUTH_SCHEME = re.compile(r"(?P<scheme>\b(?:Bearer|Basic)\s+)(?P<value>[A-Za-z0-9._~+/=\-]+)", re.IGNORECASE)
# `name=value`, `name: value`, `"name": "value"`; the value stops at whitespace, quotes and separators.
_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z_][\w.\-]*)(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s'\",;)}\]]+)",
)
_TOKEN_PREFIXES = re.compile(
    r"^(?:(?:hf_|api_org_|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|glpat-|sk-|sk_live_|rk_live_|xox[abposr]-|ya29\.|"
    r"KGAT_)[A-Za-z0-9_\-]{16,}|(?:AKIA|ASIA)[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{30,}|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[\w.\-]*)"
)
_EXCEPTION_NAME = re.compile(r"(?:Error|Exception|Warning)$")
# A value that stands for one in instructions (`KAGGLE_KEY=<key>`, `"key": ...`), closing quote allowed.
_PLACEHOLDER = re.compile(r"(?:<[\w\- ]*>|\.\.\.|…|\*\*\*)`?")
_RANDOM_LOOKING = re.compile(r"^[A-Za-z0-9_\-+=]{24,}$")


def _words(name: Any) -> list[str]:
    return [w.lower() for w in _WORD_SPLIT.split(str(name)) if w]


def is_secret_name(name: Any) -> bool:
    """True when a field name looks like it holds a credential (see the module docstring)."""
    for word in _words(name):
        if word in _NOT_SECRET_WORDS:
            continue
        if any(word.startswith(stem) or word.endswith(stem) for stem in _STEMS):
            return True
    return False


def looks_like_secret(value: str) -> bool:
    """True for a string that looks like a credential whatever its name: a known token prefix (`hf_...`,
    `ghp_...`, `sk-...`, a JWT), or a long random-looking run of letters and digits (no spaces, dots or slashes,
    so paths, file names and model names are not caught)."""
    if _TOKEN_PREFIXES.match(value):
        return True
    if not _RANDOM_LOOKING.match(value) or not re.search(r"\d", value) or not re.search(r"[A-Za-z]", value):
        return False
    counts = Counter(value)
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return entropy >= 3.5  # Random base64/hex of this length is ~4 bits per character; words are < 3.5.


def redact_text(text: str) -> str:
    """`text` with URL credentials, `Bearer`/`Basic` values and secret-looking `name=value` values masked."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))
    text = _AUTH_SCHEME.sub(lambda m: f"{m['scheme']}{MASK}", text)

    def assignment(m: re.Match) -> str:
        name, value = m["name"], m["value"]
        if value == MASK or _PLACEHOLDER.fullmatch(value) or _EXCEPTION_NAME.search(name):  # `KeyError: 'x'`.
            return m.group(0)
        if not (is_secret_name(name) or looks_like_secret(value)):
            return m.group(0)
        return f"{m['name']}{m['sep']}{MASK}"

    text = _ASSIGNMENT.sub(assignment, text)
    # A bare token anywhere else (e.g. a positional argument echoed in a message).
    return re.sub(r"[A-Za-z0-9_\-+=.]{8,}", lambda m: MASK if _TOKEN_PREFIXES.match(m.group(0)) else m.group(0), text)


def _is_secret_field(name: Any, value: Any) -> bool:
    return isinstance(value, str) and bool(value) and is_secret_name(name)


def redact(tree: Any) -> Any:
    """A copy of a nested dict/list with credential-like string fields removed and every other string passed
    through `redact_text` (a password inside a URL, a `Bearer` value)."""
    if isinstance(tree, dict):
        return {k: redact(v) for k, v in tree.items() if not _is_secret_field(k, v)}
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


# Categories shown escaped on a terminal: controls (ESC, BEL, CR, ...), format characters (bidi overrides,
# zero-width joiners), line/paragraph separators, surrogates and private use.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: Any) -> str:
    """`text` for a terminal: every control or invisible formatting character (ESC of an ANSI sequence, a bidi
    override, a carriage return, a newline) written as a Python escape (`\\x1b`, `\\u202e`, `\\r`, `\\n`), so a
    caption can neither recolour nor rewrite the console, nor hide text. Printable characters of any script stay."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in _HIDDEN:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|~])")


def md_text(text: Any) -> str:
    """`text` as literal inline Markdown (a table cell, the rest of a list item): HTML special characters as
    entities (`<script>` is shown, not run), inline Markdown syntax escaped with backslashes (`![x](http://...)`
    is shown as text, no remote image is fetched; `|` cannot split a table cell), newlines as spaces, control
    characters made visible."""
    text = printable(" ".join(str(text).splitlines()))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_fence(text: str, info: str = "") -> list[str]:
    """Lines of a fenced code block holding `text`, with a fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence]


def md_code(text: Any) -> str:
    """`text` as an inline Markdown code span (HTML is not interpreted there), with a backtick fence longer than
    any backtick run inside it, on one line, control characters made visible."""
    text = printable(" ".join(str(text).splitlines()))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
