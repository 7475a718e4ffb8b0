"""Expert routing: classify a request, then choose the healthy model that should serve it.

Two halves, both pure (no I/O; standard library and `specs` only, so the gateway's
classifier plugin can import this module without the solver or the drivers):

- `Classifier` puts a request in one of the six `Category`s. It takes a plain
  prompt or a JSON body (OpenAI chat completions, completions or embeddings;
  an Anthropic-style top-level `system`), is deterministic, takes microseconds
  and says which signals decided. Its rules are the built-in defaults merged
  with the spec's `routing.rules`.
- `choose` walks a category's preferred models, skips those that are unplaced
  or unhealthy, follows the category's `fallback`, and returns a `Route`: the
  endpoint and why it was chosen.

How a request is classified, in order:

1. an image in any user message → `vision`; an embeddings body (`input`) → `embed`;
2. every rule votes: a keyword or phrase (matched on whole words, case-insensitive),
   a regular expression, or a file name with one of its extensions each add the
   signal's weight × the rule's `weight`; text of the last user message counts fully,
   the system prompt and earlier user turns count a quarter (`CONTEXT_WEIGHT`);
3. the category with the highest score ≥ `THRESHOLD` wins (ties: code, reason,
   vision, embed, fast, chat);
4. else a prompt of at most `fast_max_words` words with no conversational signal
   (why, explain, write …) is `fast`; anything else is `default_category`.

Errors, all one line, for the user::

    ValueError
     ├─ RequestError   the request cannot be classified (empty, malformed, wrong shape)
     └─ RouteError     no healthy model can serve it (or the spec names none)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specs.enums import Category, Runtime, Tier
from specs.model import ClassifierRule, ClusterSpec, Routing

if TYPE_CHECKING:
    from controller.state import ClusterState

GROUP_PREFIX = "expert/"
"""The gateway's model group of a category: `expert/<category>` (as `controller.gateway` renders it)."""

THRESHOLD = 1.0
"""A category needs at least this score to win on its signals."""

CONTEXT_WEIGHT = 0.25
"""How much the system prompt and earlier user turns count against the last user message."""

TIE_ORDER: tuple[Category, ...] = (
    Category.CODE,
    Category.REASON,
    Category.VISION,
    Category.EMBED,
    Category.FAST,
    Category.CHAT,
)
"""Equal scores go to the more specialised category."""


class RequestError(ValueError):
    """The request cannot be classified (one line, for the user)."""


class RouteError(ValueError):
    """No model can serve the request (one line, for the user)."""


# --------------------------------------------------------------------------- default rules


@dataclass(frozen=True, eq=False, slots=True)
class Signal:
    """One compiled signal: a keyword or phrase, a regex or a file extension.

    Compared by identity: the classifier makes one per (category, label, weight), so
    patterns sharing a label are one signal and count once.
    """

    category: Category
    label: str
    weight: float


@dataclass(frozen=True)
class _Rule:
    """A rule before compilation: built in, or from the spec."""

    category: Category
    keywords: tuple[str, ...] = ()
    patterns: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """(label, regex, prefilter): the regex runs only on text containing one of the prefilter strings
    (always, when there are none). Patterns sharing a label are one signal."""
    file_extensions: tuple[str, ...] = ()
    weight: float = 1.0
    pattern_weight: float = 1.0
    """Each pattern counts this much (× `weight`); built-in structural patterns are strong."""
    word_problems: bool = False
    """Vote for a text with several numbers and a quantity question ("how long …?")."""


_CODE_KEYWORDS = (
    # languages and runtimes
    "python", "python3", "javascript", "typescript", "js", "ts", "node.js", "nodejs", "rust", "golang",
    "java", "kotlin", "c#", "c++", "cpp", "csharp", "ruby", "php", "perl", "lua", "swift", "scala",
    "haskell", "elixir", "bash", "zsh", "powershell", "shell script", "sql", "html", "css", "jsx", "tsx",
    # tools
    "git", "github", "gitlab", "docker", "dockerfile", "docker-compose", "compose file", "kubernetes",
    "kubectl", "k8s", "helm", "terraform", "ansible", "nginx", "systemd", "systemctl", "makefile", "cmake",
    "gcc", "clang", "npm", "yarn", "pnpm", "pip", "conda", "venv", "virtualenv", "cargo", "pytest",
    "jest", "webpack", "vite", "gitignore", "regex", "regexp", "grep", "sed", "awk", "curl", "ssh",
    "react", "vue", "django", "flask", "fastapi", "express", "pandas", "numpy", "dataframe", "postgres",
    "postgresql", "mysql", "sqlite", "redis", "mongodb", "llama-server", "cuda",
    # programming words
    "code", "coding", "function", "functions", "method", "methods", "class", "classes", "variable",
    "variables", "compile", "compiler", "compiles", "compiling", "syntax", "debug", "debugging", "bug",
    "bugs", "exception", "stack trace", "stacktrace", "traceback", "segfault", "segmentation fault",
    "core dumped", "null pointer", "pointer", "refactor", "refactoring", "api", "endpoint", "json", "yaml",
    "script", "scripts", "for loop", "while loop", "loop", "array", "arrays", "linked list", "hashmap",
    "hash map", "dictionary", "recursion", "recursive", "algorithm", "time complexity", "big-o",
    "async", "await", "thread safe", "thread-safe", "mutex", "race condition", "unit test", "unit tests",
    "test case", "fixture", "query", "queries", "schema", "commit", "rebase", "merge conflict", "branch",
    "pull request", "repo", "repository", "library", "package", "dependency", "dependencies",
    "implement", "implementation", "idiomatic", "off-by-one", "struct", "structs", "enum", "interface",
    "generic", "generics", "lambda", "callback", "closure", "boolean", "integer overflow", "string",
    "parse", "parser", "cli", "command line", "config file", "env var", "environment variable",
    "container", "image size", "port", "localhost", "stdout", "stderr", "crashloopbackoff", "deploy",
    "deployment", "build", "linter", "type hint", "typescript's", "undefined", "null", "nan", "unwrap",
    "borrow checker", "lifetime", "goroutine", "decorator", "iterator", "generator", "comprehension",
)  # fmt: skip

_CODE_EXTENSIONS = (
    ".py", ".pyi", ".ipynb", ".js", ".mjs", ".cjs", ".ts", ".jsx", ".tsx", ".vue", ".svelte", ".rs",
    ".go", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".java", ".kt", ".cs", ".rb", ".php", ".pl",
    ".lua", ".swift", ".scala", ".sh", ".bash", ".zsh", ".ps1", ".bat", ".sql", ".yaml", ".yml",
    ".toml", ".json", ".ini", ".conf", ".cfg", ".env", ".tf", ".hcl", ".html", ".css", ".scss",
    ".xml", ".gradle", ".mk", ".cmake", ".dockerfile", ".lock", ".proto", ".graphql", ".nix",
)  # fmt: skip

_CODE_PATTERNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (label, regex, prefilter: the regex is only run on text holding one of these)
    ("code fence", r"```", ("```",)),
    ("Python traceback", r"Traceback \(most recent call last\)|^\s*File \"[^\"]+\", line \d+", ("Traceback", 'File "')),
    ("error name", r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b", ("Error", "Exception")),
    ("compiler error", r"^(?:error|warning)(?:\[E\d+\])?: ", ("error", "warning")),
    ("stack frame", r"^\s+at [\w$.<>]+ \(?[^\s()]+:\d+(?::\d+)?\)?\s*$", ("\n    at ", "\n\tat ", "\n  at ")),
    ("stack frame", r"\.(?:go|rs|c|cc|cpp|h|java|kt|js|jsx|ts|tsx|py|rb|php|cs):\d+", (":",)),
    ("panic", r"^panic: |^goroutine \d+ \[|Exception in thread \"", ("panic: ", "goroutine ", "Exception in thread")),
)
"""Strong signals: each counts 3."""

_CODE_SYNTAX: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "definition",
        r"^\s*(?:def|fn|func|function|class|struct|impl|public|private|static|import|from \S+ import"
        r"|#include|package|const|let|var|async def|export)\b[^\n]*[({:=;]",
        (),
    ),
    ("call", r"\w\.[A-Za-z_]\w*\(", (".",)),
    ("call", r"\w\(\)", ("()",)),
    ("operator", r"=>|->|::|!==?|===?|&&|\|\||\+\+|\+=|-=", ()),
    ("statement end", r"[;{}][ \t]*$", (";", "{", "}")),
    ("inline code", r"`[^`\n]+`", ("`",)),
    ("shell prompt", r"^\s*\$ \w", ("$ ",)),
    ("camelCase name", r"(?<![A-Za-z])[a-z]{2,}[A-Z][a-z]", ()),
    ("snake_case name", r"\b[a-z][a-z0-9]*_[a-z0-9_]+\b", ("_",)),
    ("indented block", r"^(?: {4}|\t)\S.*\n(?: {4}|\t)\S", ("\n    ", "\n\t")),
)
"""Weak signals: each counts 1."""

_REASON_KEYWORDS = (
    "prove", "proof", "proofs", "theorem", "lemma", "corollary", "derive", "derivation", "integral",
    "integrate", "derivative", "differentiate", "the limit as", "calculus", "algebra", "geometry",
    "trigonometry", "probability", "probabilities", "expected value", "expected number", "eigenvalue",
    "eigenvalues", "eigenvector", "determinant", "matrix", "equation", "equations", "solve", "solve for",
    "induction", "irrational", "prime", "primes", "puzzle", "riddle", "paradox", "logic", "logical",
    "logically", "syllogism", "fallacy", "premise", "therefore", "step by step", "step-by-step",
    "think carefully", "reason carefully", "reason through", "think through", "work through",
    "rigorous", "rigorously", "justify", "show that", "show your work", "show your steps", "remainder",
    "modulo", "factorial", "combinatorics", "permutations", "combinations", "how many ways", "maximise",
    "maximize", "minimise", "minimize", "optimal", "calculate", "calculation", "compute", "reasoning",
    "deduce", "infer", "injective", "surjective", "bijective", "converge", "converges", "divergent",
    "polynomial", "quadratic", "inequality", "sequence", "series", "sum of", "average speed", "odds",
)  # fmt: skip

_REASON_PATTERNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("equation", r"\d[a-z]\s*[-+=*/^]", ()),
    ("equation", r"[a-z0-9)]\s*\^\s*\d", ("^",)),
    ("equation", r"\b[a-z]\([a-z]\)\s*=", (") =", ")=")),
    ("inequality", r"\b[a-z]\s*(?:>=|<=|≥|≤)\s*\d", (">=", "<=", "≥", "≤")),
    ("math symbol", r"[∫∑∏√π≤≥≠∞∂∀∃∈⇒]", ("∫", "∑", "∏", "√", "π", "≤", "≥", "≠", "∞", "∂", "∀", "∃", "∈", "⇒")),
    ("math function", r"\b(?:sin|cos|tan|log|ln|exp|sqrt)\(", ("sin(", "cos(", "tan(", "log(", "ln(", "exp(", "sqrt(")),
)
"""Each counts 1.5."""

_FAST_GREETINGS = (
    "hi", "hello", "hey", "heya", "hiya", "yo", "sup", "howdy", "hola", "bonjour", "ciao", "hallo",
    "thanks", "thank you", "thx", "ty", "cheers", "bye", "goodbye", "good morning", "good afternoon",
    "good evening", "good night", "gm", "gn", "ok", "okay", "ping", "are you there", "how are you",
)  # fmt: skip

_CHAT_WORDS = (
    "why", "explain", "describe", "tell me", "write", "rewrite", "draft", "summarise", "summarize",
    "translate", "recommend", "suggest", "advice", "opinion", "what do you think", "compare", "story",
    "poem", "email", "letter", "help me", "feel", "feeling",
)  # fmt: skip


def _default_rules() -> dict[Category, list[_Rule]]:
    return {
        Category.CODE: [
            _Rule(Category.CODE, keywords=_CODE_KEYWORDS, file_extensions=_CODE_EXTENSIONS),
            _Rule(Category.CODE, patterns=_CODE_PATTERNS, pattern_weight=3.0),
            _Rule(Category.CODE, patterns=_CODE_SYNTAX),
        ],
        Category.REASON: [
            _Rule(Category.REASON, keywords=_REASON_KEYWORDS),
            _Rule(Category.REASON, patterns=_REASON_PATTERNS, pattern_weight=1.5, word_problems=True),
        ],
        Category.FAST: [_Rule(Category.FAST, keywords=_FAST_GREETINGS)],
        # Conversational wording: too weak to win (0.5 < THRESHOLD), it keeps a short question
        # such as "why do cats purr?" from being sent to the fast model.
        Category.CHAT: [_Rule(Category.CHAT, keywords=_CHAT_WORDS, weight=0.5)],
    }


def rules_from_spec(routing: Routing) -> dict[Category, list[_Rule]]:
    """The defaults merged with the spec's rules (`replace_defaults` drops that category's defaults)."""
    merged = _default_rules()
    for category, rule in routing.rules.items():
        extra = _spec_rule(category, rule)
        if rule.replace_defaults:
            merged[category] = [extra]
        else:
            merged.setdefault(category, []).append(extra)
    return merged


def _spec_rule(category: Category, rule: ClassifierRule) -> _Rule:
    return _Rule(
        category,
        keywords=tuple(rule.keywords),
        patterns=tuple((f"pattern {p!r}", p, ()) for p in rule.patterns),
        file_extensions=tuple(rule.file_extensions),
        weight=rule.weight,
    )


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ParsedRequest:
    """What the classifier looks at, pulled out of whatever shape the request came in."""

    text: str
    """The last user message (or the prompt)."""
    context: str = ""
    """The system prompt and earlier user turns: weak evidence."""
    images: int = 0
    """Image parts in user messages."""
    embed: bool = False
    """An embeddings body (`input`)."""
    shape: str = "prompt"
    """prompt, chat, completion, embeddings."""


_TEXT_PARTS = frozenset({"text", "input_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image", "image_file"})


def parse_json(text: str) -> object:
    """A JSON request body, or a one-line RequestError saying where it is malformed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON request: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError("malformed JSON request: nested too deeply") from None


def _content(content: object, where: str) -> tuple[str, int]:
    """(text, image parts) of a message's content: a string or a list of parts."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: must be a string or a list of content parts")
    texts: list[str] = []
    images = 0
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RequestError(f"{where}.content[{i}]: must be an object with a `type`")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            value = part.get("text")
            if not isinstance(value, str):
                raise RequestError(f"{where}.content[{i}].text: must be a string")
            texts.append(value)
        elif kind in _IMAGE_PARTS:
            images += 1
        # other parts (audio, files, tool results) carry no text to classify
    return "\n".join(texts), images


def _system_text(system: object) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(p["text"] for p in system if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise RequestError("system: must be a string or a list of text blocks")


def _parse_messages(body: Mapping[str, Any]) -> ParsedRequest:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: must be a non-empty list")
    last_user: int | None = None
    parsed: list[tuple[str, str, int]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}]: must be an object with `role` and `content`")
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(f"messages[{i}].role: must be a string")
        text, images = _content(message.get("content"), f"messages[{i}]")
        parsed.append((role, text, images))
        if role == "user":
            last_user = i
    if last_user is None:
        raise RequestError("messages: no message with role `user`")
    context = [_system_text(body.get("system"))]
    images = 0
    for i, (role, text, n) in enumerate(parsed):
        if role in ("system", "developer"):
            context.append(text)
        elif role == "user":
            images += n
            if i != last_user:
                context.append(text)
    text = parsed[last_user][1]
    if not text.strip() and images == 0:
        raise RequestError(f"messages[{last_user}]: the last user message is empty")
    return ParsedRequest(text=text, context="\n".join(c for c in context if c), images=images, shape="chat")


def _parse_embeddings(value: object) -> ParsedRequest:
    if isinstance(value, str):
        if not value.strip():
            raise RequestError("input: the embeddings input is empty")
        return ParsedRequest(text=value, embed=True, shape="embeddings")
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return ParsedRequest(text="\n".join(value), embed=True, shape="embeddings")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(
            isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value
        ):
            return ParsedRequest(text="", embed=True, shape="embeddings")
        raise RequestError("input: must be a string, a list of strings, or token ids")
    raise RequestError("input: the embeddings input is empty" if value == [] else "input: must be a string or a list")


def parse_request(request: object) -> ParsedRequest:
    """Pull the text (and images, or the embeddings input) out of a prompt or a request body."""
    if isinstance(request, ParsedRequest):
        return request
    if isinstance(request, str):
        if not request.strip():
            raise RequestError("empty prompt")
        return ParsedRequest(text=request)
    if not isinstance(request, Mapping):
        raise RequestError(f"a request must be a prompt or a JSON object, not {type(request).__name__}")
    if "messages" in request:
        return _parse_messages(request)
    if "input" in request:
        return _parse_embeddings(request["input"])
    if "prompt" in request:
        prompt = request["prompt"]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompt = "\n".join(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return ParsedRequest(text="", shape="completion")  # token ids: nothing to read
        if not isinstance(prompt, str):
            raise RequestError("prompt: must be a string or a list of strings")
        if not prompt.strip():
            raise RequestError("prompt: empty prompt")
        return ParsedRequest(text=prompt, context=_system_text(request.get("system")), shape="completion")
    raise RequestError("request body has no `messages`, `prompt` or `input`")


# --------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class Classification:
    """A category, the signals that decided it (best first), and every category's score."""

    category: Category
    signals: tuple[str, ...]
    scores: Mapping[Category, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "category": self.category.value,
            "signals": list(self.signals),
            "scores": {c.value: round(s, 3) for c, s in self.scores.items() if s},
        }


_TOKEN_RE = re.compile(r"[a-z0-9_#+$]+(?:['.\-/][a-z0-9_#+]+)*")
"""Words as the classifier sees them: `main.rs`, `docker-compose.yml`, `c++`, `don't` are one word each."""
_MAX_PHRASE = 4
_NUMBER_WORDS = frozenset((
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "half", "twice", "double",
))  # fmt: skip
_QUANTITY_QUESTION = re.compile(
    r"\b(?:how (?:long|many|much|far|fast|old|often|tall|big|heavy)|what time|at what|which day"
    r"|what day|when (?:will|does|do|did|is))\b"
)
SCAN_HEAD = 1500
SCAN_TAIL = 500
"""A long request is read at its start and its end (a pasted file with the question after it):
classification stays microseconds whatever the size."""
WORD_PROBLEM_NUMBERS = 3
"""A word problem has at least this many numbers (digits or words) and a quantity question."""


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    prefilter: tuple[str, ...]
    signal: Signal


class Classifier:
    """Compiled rules: keyword and phrase tables, file extensions, regexes with prefilters.

    Build once (`from_spec`), classify often: each request is lowercased and split into words
    once, words and phrases are dictionary look-ups, and a regex runs only when its prefilter
    strings occur in the text and only until its first match (each signal counts once).
    """

    def __init__(
        self,
        rules: Mapping[Category, Sequence[_Rule]],
        default_category: Category = Category.CHAT,
        fast_max_words: int = 6,
    ) -> None:
        self.default_category = default_category
        self.fast_max_words = fast_max_words
        self._words: dict[str, list[Signal]] = {}
        self._phrases: dict[tuple[str, ...], list[Signal]] = {}
        self._phrase_sizes: dict[str, list[int]] = {}
        """First word of a phrase → the lengths of the phrases starting with it."""
        self._extensions: dict[str, list[Signal]] = {}
        self._patterns: list[_Pattern] = []
        self._word_problems: list[Signal] = []
        self._made: dict[tuple[Category, str, float], Signal] = {}
        for category, category_rules in rules.items():
            for rule in category_rules:
                self._add(category, rule)

    def _signal(self, category: Category, label: str, weight: float) -> Signal:
        key = (category, label, weight)
        if key not in self._made:
            self._made[key] = Signal(category, label, weight)
        return self._made[key]

    def _add(self, category: Category, rule: _Rule) -> None:
        for keyword in rule.keywords:
            words = tuple(_tokens(keyword))[:_MAX_PHRASE]
            if not words:
                continue
            signal = self._signal(category, f"keyword '{keyword.lower()}'", rule.weight)
            if len(words) == 1:
                self._words.setdefault(words[0], []).append(signal)
            else:
                self._phrases.setdefault(words, []).append(signal)
                sizes = self._phrase_sizes.setdefault(words[0], [])
                if len(words) not in sizes:
                    sizes.append(len(words))
        for ext in rule.file_extensions:
            self._extensions.setdefault(ext.lower(), []).append(
                self._signal(category, f"file name *{ext.lower()}", rule.weight)
            )
        for label, pattern, prefilter in rule.patterns:
            try:
                regex = re.compile(pattern, re.MULTILINE)
            except re.error as exc:
                raise RequestError(f"routing.rules.{category.value}: bad pattern {pattern!r}: {exc}") from None
            signal = self._signal(category, label, rule.weight * rule.pattern_weight)
            self._patterns.append(_Pattern(regex, prefilter, signal))
        if rule.word_problems:
            label = "word problem (numbers and a quantity question)"
            self._word_problems.append(self._signal(category, label, rule.weight))

    @classmethod
    def from_spec(cls, routing: Routing | None = None) -> Classifier:
        """The defaults merged with `routing.rules`, and the spec's default category and fast limit."""
        routing = routing or Routing()
        return cls(rules_from_spec(routing), routing.default_category, routing.fast_max_words)

    def _signals(self, text: str) -> tuple[list[Signal], int]:
        """Every signal found in `text` (repeats included), and its number of words (of the part read)."""
        if len(text) > SCAN_HEAD + SCAN_TAIL:
            text = text[:SCAN_HEAD] + "\n" + text[-SCAN_TAIL:]
        lowered = text.lower()
        tokens = _TOKEN_RE.findall(lowered)
        found: list[Signal] = []
        words = self._words
        extensions = self._extensions
        phrase_sizes = self._phrase_sizes
        phrases = self._phrases
        numbers = 0
        n = len(tokens)
        for i, token in enumerate(tokens):
            signals = words.get(token)
            if signals is not None:
                found.extend(signals)
            sizes = phrase_sizes.get(token)
            if sizes is not None:
                for size in sizes:
                    if i + size <= n:
                        signals = phrases.get(tuple(tokens[i : i + size]))
                        if signals is not None:
                            found.extend(signals)
            first = token[0]
            if first.isdigit() or token in _NUMBER_WORDS:
                numbers += 1
            elif "." in token and extensions:
                dot = token.rfind(".")
                if dot > 0:
                    signals = extensions.get(token[dot:])
                    if signals is not None:
                        found.extend(signals)
        for p in self._patterns:
            if p.prefilter:
                for marker in p.prefilter:
                    if marker in text:
                        break
                else:
                    continue
            if p.regex.search(text) is not None:
                found.append(p.signal)
        if self._word_problems and numbers >= WORD_PROBLEM_NUMBERS and _QUANTITY_QUESTION.search(lowered):
            found.extend(self._word_problems)
        return found, n

    def classify(self, request: object) -> Classification:
        """The category of a prompt, a request body (dict) or a `ParsedRequest`."""
        parsed = parse_request(request)
        if parsed.images:
            n = parsed.images
            return Classification(Category.VISION, (f"{n} image part{'s' if n != 1 else ''} in the messages",))
        if parsed.embed:
            return Classification(Category.EMBED, ("embeddings request (`input`)",))
        if not parsed.text:
            return Classification(self.default_category, ("token ids only: nothing to read",))
        found, words = self._signals(parsed.text)
        short = words <= self.fast_max_words
        # (signal, counts as) — each signal once; context counts CONTEXT_WEIGHT of its weight
        votes: dict[Signal, float] = {}
        for signal in found:
            if signal.category is Category.FAST and not short:
                continue  # greetings only mean `fast` in a short message ("hi!", not "Hi! I'm setting up …")
            votes[signal] = signal.weight
        if parsed.context:
            for signal in self._signals(parsed.context)[0]:
                if signal.category is not Category.FAST and signal not in votes:
                    votes[signal] = signal.weight * CONTEXT_WEIGHT
        scores: dict[Category, float] = {}
        for signal, weight in votes.items():
            scores[signal.category] = scores.get(signal.category, 0.0) + weight
        best: Category | None = None
        for category in (*TIE_ORDER, *(c for c in scores if c not in TIE_ORDER)):
            score = scores.get(category, 0.0)
            if score >= THRESHOLD and (best is None or score > scores[best] + 1e-9):
                best = category
        if best is not None:
            return Classification(best, _explain(best, votes), scores)
        if short and scores.get(Category.CHAT, 0.0) <= 0.0:
            s = "s" if words != 1 else ""
            return Classification(Category.FAST, (f"short prompt: {words} word{s} ≤ {self.fast_max_words}",), scores)
        why = _explain(self.default_category, votes)
        return Classification(self.default_category, (*why, "no stronger signal: default category"), scores)


def _explain(category: Category, votes: Mapping[Signal, float]) -> tuple[str, ...]:
    """The signals that voted for `category`, strongest first (context marked as such)."""
    ranked = sorted(((s, w) for s, w in votes.items() if s.category is category), key=lambda sw: -sw[1])
    return tuple(
        s.label if w >= s.weight else f"{s.label} (in the system prompt or an earlier turn)" for s, w in ranked
    )


_DEFAULT: Classifier | None = None


def classify(request: object, routing: Routing | None = None) -> Classification:
    """Classify with the spec's rules (or the defaults; that classifier is built once)."""
    global _DEFAULT
    if routing is not None:
        return Classifier.from_spec(routing).classify(request)
    if _DEFAULT is None:
        _DEFAULT = Classifier.from_spec()
    return _DEFAULT.classify(request)


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """Where one placed replica of a model answers."""

    model: str
    node: str
    tier: Tier
    runtime: Runtime
    url: str
    """The base URL a client calls: `http://<address>:<port>/v1` (llama.cpp), the node's Ollama URL."""
    health_url: str
    """What is probed: llama.cpp `/health`, Ollama `/api/tags`."""
    served_model: str
    """The name the server answers to: the llama.cpp alias, or the derived Ollama model `homelab/<model>:latest`."""


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def endpoints_from_state(spec: ClusterSpec, desired: ClusterState) -> dict[str, tuple[Endpoint, ...]]:
    """model → its endpoints, from the rendered desired state (`controller.desired.render`), in node order."""
    out: dict[str, list[Endpoint]] = {}
    for name in sorted(desired.nodes):
        state = desired.nodes[name]
        node = spec.node(name)
        for c in state.containers:
            if c.config is None:
                continue
            out.setdefault(c.model, []).append(
                Endpoint(
                    model=c.model,
                    node=name,
                    tier=node.tier,
                    runtime=Runtime.LLAMACPP,
                    url=f"http://{_host(node.address)}:{c.config.port}/v1",
                    health_url=c.health_url,
                    served_model=c.config.alias,
                )
            )
        if state.ollama is not None:
            base = state.ollama.url.rstrip("/")
            for m in state.ollama.models:
                out.setdefault(m.model, []).append(
                    Endpoint(
                        model=m.model,
                        node=name,
                        tier=node.tier,
                        runtime=Runtime.OLLAMA,
                        url=base,
                        health_url=f"{base}/api/tags",
                        served_model=m.name,
                    )
                )
    return {model: tuple(eps) for model, eps in out.items()}


# --------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class EndpointHealth:
    """Whether an endpoint can take a request now, and if not, why ("connection refused", "loading")."""

    healthy: bool
    reason: str = ""


HealthView = Callable[[Endpoint], EndpointHealth | bool | None]
"""What `choose` asks about each candidate endpoint. None means unknown, and counts as healthy
(not known to be down): a health module answers for every endpoint it has probed."""

HealthInput = HealthView | Mapping[str, EndpointHealth | bool] | None
"""A `HealthView`; or a mapping keyed by health URL or by model name (missing keys are healthy);
or None: every endpoint is healthy (`homelab route --no-health`)."""


def _health_of(health: HealthInput, endpoint: Endpoint) -> EndpointHealth:
    if health is None:
        return EndpointHealth(True)
    if isinstance(health, Mapping):
        answer = health.get(endpoint.health_url, health.get(endpoint.model))
    else:
        answer = health(endpoint)
    if answer is None:
        return EndpointHealth(True)
    if isinstance(answer, bool):
        return EndpointHealth(answer, "" if answer else "unhealthy")
    return answer


@dataclass(frozen=True)
class Skipped:
    """A candidate that was passed over, and why."""

    category: Category
    model: str
    why: str

    def to_json(self) -> dict[str, str]:
        return {"category": self.category.value, "model": self.model, "why": self.why}


@dataclass(frozen=True)
class Route:
    """The endpoint that should serve a request, and why it was chosen."""

    requested: Category
    """The category the request was classified as."""
    category: Category
    """The category whose model serves it (the requested one, or a fallback)."""
    endpoint: Endpoint
    fallback_used: bool
    """True when the first choice of the requested category could not serve."""
    reason: str
    skipped: tuple[Skipped, ...] = ()
    classification: Classification | None = None

    @property
    def model(self) -> str:
        return self.endpoint.model

    @property
    def gateway_model(self) -> str:
        """The gateway's model group for the category that served: `expert/<category>`."""
        return GROUP_PREFIX + self.category.value

    def to_json(self) -> dict[str, object]:
        e = self.endpoint
        out: dict[str, object] = {
            "category": self.category.value,
            "requested_category": self.requested.value,
            "model": e.model,
            "node": e.node,
            "tier": e.tier.value,
            "runtime": e.runtime.value,
            "url": e.url,
            "served_model": e.served_model,
            "gateway_model": self.gateway_model,
            "gateway_model_direct": e.model,
            "fallback_used": self.fallback_used,
            "reason": self.reason,
            "skipped": [s.to_json() for s in self.skipped],
        }
        if self.classification is not None:
            out["signals"] = list(self.classification.signals)
        return out


def category_models(spec: ClusterSpec, category: Category) -> list[str]:
    """A category's preferred models, best first: its `routing.categories` entry, or else every
    model that lists the category, by priority (highest first) then name."""
    route = spec.routing.categories.get(category)
    if route is not None:
        return list(route.models)
    models = [m for m in spec.models if category in m.categories]
    return [m.name for m in sorted(models, key=lambda m: (-m.priority, m.name))]


def fallback_chain(spec: ClusterSpec, category: Category) -> list[Category]:
    """The category, then its fallback, that one's fallback … (a cycle stops at the first repeat)."""
    chain = [category]
    route = spec.routing.categories.get(category)
    while route is not None and route.fallback is not None and route.fallback not in chain:
        chain.append(route.fallback)
        route = spec.routing.categories.get(route.fallback)
    return chain


def candidates(spec: ClusterSpec, category: Category) -> list[tuple[Category, str]]:
    """Every (category, model) `choose` may try, in order; a model is tried once."""
    out: list[tuple[Category, str]] = []
    seen: set[str] = set()
    for cat in fallback_chain(spec, category):
        for model in category_models(spec, cat):
            if model not in seen:
                seen.add(model)
                out.append((cat, model))
    return out


def choose(
    spec: ClusterSpec,
    category: Category,
    endpoints: Mapping[str, Sequence[Endpoint]],
    health: HealthInput = None,
    classification: Classification | None = None,
) -> Route:
    """The first healthy endpoint of the category's preferred models, then of its fallback categories.

    `endpoints` is model → its placed replicas (`endpoints_from_state`); a model with none is unplaced.
    """
    known = {m.name for m in spec.models}
    skipped: list[Skipped] = []
    tried = candidates(spec, category)
    for cat, model in tried:
        if model not in known:
            raise RouteError(f"routing.categories.{cat.value}: unknown model '{model}'")
        replicas = endpoints.get(model, ())
        if not replicas:
            skipped.append(Skipped(cat, model, "not placed"))
            continue
        down: list[str] = []
        for endpoint in replicas:
            state = _health_of(health, endpoint)
            if state.healthy:
                return Route(
                    requested=category,
                    category=cat,
                    endpoint=endpoint,
                    fallback_used=bool(skipped) or bool(down),
                    reason=_reason(category, cat, endpoint, skipped, down),
                    skipped=tuple(skipped),
                    classification=classification,
                )
            down.append(f"on {endpoint.node}: {state.reason or 'unhealthy'}")
        skipped.append(Skipped(cat, model, "down (" + "; ".join(down) + ")"))
    if not tried:
        raise RouteError(
            f"no model serves '{category.value}': add it to routing.categories.{category.value}"
            f" or to a model's categories"
        )
    why = "; ".join(f"{s.model} is {s.why}" for s in skipped)
    chain = " → ".join(c.value for c in fallback_chain(spec, category))
    raise RouteError(f"no healthy model for '{category.value}' (tried {chain}): {why}")


def _reason(
    requested: Category, served: Category, endpoint: Endpoint, skipped: Sequence[Skipped], down: Sequence[str]
) -> str:
    where = f"{endpoint.model} on {endpoint.node}"
    if not skipped and not down:
        return f"{where}: first choice for {requested.value}"
    parts = [f"{s.model} is {s.why}" for s in skipped]
    if down:
        parts.append(f"{endpoint.model} is down " + "; ".join(down))
    if served is not requested:
        return "; ".join(parts) + f"; no {requested.value} model is up, falling back to {served.value}: using {where}"
    return "; ".join(parts) + f"; using {where}"


def route(
    spec: ClusterSpec,
    request: object,
    endpoints: Mapping[str, Sequence[Endpoint]],
    health: HealthInput = None,
    classifier: Classifier | None = None,
) -> Route:
    """Classify `request` with the spec's rules and choose its endpoint."""
    classification = (classifier or Classifier.from_spec(spec.routing)).classify(request)
    return choose(spec, classification.category, endpoints, health, classification)


def models_to_probe(spec: ClusterSpec, category: Category) -> list[str]:
    """The models whose health decides a route for `category`."""
    return [model for _, model in candidates(spec, category)]
