"""The request classifier: which expert category a request belongs to. Standard library only.

This module is the classifier's whole core, and it imports nothing but the standard library,
so that the same code runs in two places:

- in homelab, behind `controller.core.routing.Classifier` (`homelab route`, `homelab health`);
- inside the LiteLLM proxy, whose virtualenv has no homelab: `controller.core.gateway_config` writes this
  file's source, followed by the spec's routing rules as JSON and one `LiteLLMClassifier`
  instance, next to the proxy's config (`homelab_router.py`), and the config names that
  instance as the `classifier_plugin` of its `auto` model (see `LiteLLMClassifier`).

Categories are plain strings here (`controller.core.routing` turns them into `specs.enums.Category`);
the rules from the spec arrive as a JSON-able mapping (`Classifier.from_config`), the same one
homelab and the plugin build their classifier from.

How a request is classified, in order:

1. an image in any user message → `vision`; an embeddings body (`input`) → `embed`;
2. every rule votes: a keyword or phrase (matched on whole words, case-insensitive),
   a regular expression, or a file name with one of its extensions each add the
   signal's weight × the rule's `weight`; text of the last user message counts fully,
   the system prompt and earlier user turns count a quarter (`CONTEXT_WEIGHT`);
3. the category with the highest score ≥ `THRESHOLD` wins (ties: code, reason,
   vision, embed, fast, chat);
4. else a prompt of at most `fast_max_words` words with no conversational signal
   (why, explain, write …) is `fast`; anything else is `default_category`;
5. when the rules are unsure (`CONFIDENT_SCORE`, `CONFIDENT_MARGIN`) and an embedding stage is
   set up (`EmbeddingStage`), the nearest labelled examples vote, with the rules' scores as a
   prior (`fuse`); when the embed model is down or slow, the rules' answer stands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CODE = "code"
REASON = "reason"
CHAT = "chat"
VISION = "vision"
FAST = "fast"
EMBED = "embed"
CATEGORIES = (CODE, REASON, CHAT, VISION, FAST, EMBED)
"""The categories (the values of `specs.enums.Category`)."""

THRESHOLD = 1.0
"""A category needs at least this score to win on its signals."""

CONTEXT_WEIGHT = 0.25
"""How much the system prompt and earlier user turns count against the last user message."""

TIE_ORDER: tuple[str, ...] = (
    CODE,
    REASON,
    VISION,
    EMBED,
    FAST,
    CHAT,
)
"""Equal scores go to the more specialised category."""


class RequestError(ValueError):
    """The request cannot be classified (one line, for the user)."""


# --------------------------------------------------------------------------- default rules


@dataclass(frozen=True, eq=False, slots=True)
class Signal:
    """One compiled signal: a keyword or phrase, a regex or a file extension.

    Compared by identity: the classifier makes one per (category, label, weight), so
    patterns sharing a label are one signal and count once.
    """

    category: str
    label: str
    weight: float


@dataclass(frozen=True)
class Rule:
    """A rule before compilation: built in, or from the spec."""

    category: str
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
    # reasoning asked for in words, not symbols
    "walk me through", "work it out", "work out", "work through this", "think it through", "think it over",
    "reason it out", "reason it", "reason through it", "reason carefully", "think step by step", "take it slowly",
    "show the working", "show the calculation", "show your reasoning", "each assumption", "with each assumption",
    "plan it out", "weigh up", "decide which", "which is better", "which is cheaper", "which is bigger",
    "which is faster", "is cheaper", "better deal", "cheaper overall", "better overall", "fair split",
    "what's the chance", "the chance", "chance of", "chance that", "how likely", "likelihood", "percent",
    "per cent", "interest", "compounded", "discount", "angle", "divisible", "dimensions", "estimate",
    "tells the truth", "always lies", "finishing order", "what order", "is it possible", "argument",
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
    # asking for advice or a discussion, not a fact
    "should i", "should we", "how do i", "how can i", "how should", "tips", "ideas", "difference between",
    "meaning", "history", "like to", "want to", "what happened", "how does", "how did", "pros and cons",
    "differences",
)  # fmt: skip


# The same signals in German, French, Spanish, Portuguese, Italian, Chinese and Japanese (English is above).
# Words are matched whole (accents optional: each keyword also matches without its accents); a keyword
# in Chinese or Japanese script is matched as a substring, those scripts having no spaces between words.
_CODE_KEYWORDS_I18N = (
    # de
    "funktion", "funktionen", "methode", "variable", "variablen", "schleife", "for-schleife", "verkettete liste",
    "programmieren", "programmierung", "quellcode", "kompilieren", "fehlermeldung", "skript", "abfrage",
    "datenbank", "klasse schreiben", "rekursion", "algorithmus", "zeichenkette", "befehl",
    # fr
    "fonction", "fonctions", "méthode", "boucle", "liste chaînée", "programmer", "programmation", "compiler",
    "requête sql", "base de données", "chaîne de caractères", "récursivité", "algorithme", "dépôt", "déboguer",
    "ligne de commande",
    # es
    "función", "funciones", "método", "bucle", "lista enlazada", "programar", "programación", "código",
    "compilar", "base de datos", "cadena de texto", "recursividad", "algoritmo", "repositorio", "depurar",
    "línea de comandos", "clave foránea",
    # pt
    "função", "funções", "laço", "lista ligada", "lista encadeada", "programação", "banco de dados",
    "recursão", "proxy reverso",
    # it
    "funzione", "funzioni", "metodo", "ciclo for", "lista collegata", "programmazione", "codice",
    "compilare", "ricorsione", "algoritmo", "stringa", "riga di comando",
    # zh
    "代码", "函数", "变量", "循环", "链表", "数组", "编程", "编译", "调试", "报错", "脚本", "数据库", "容器",
    "正则", "接口", "算法", "递归", "字符串", "命令行", "部署", "防抖", "节流",
    # ja
    "コード", "関数", "変数", "ループ", "配列", "プログラム", "コンパイル", "デバッグ", "エラー", "スクリプト",
    "データベース", "コンテナ", "正規表現", "アルゴリズム", "再帰", "文字列", "コマンド", "コミット", "ブランチ",
    "リポジトリ", "メソッド",
)  # fmt: skip

_REASON_KEYWORDS_I18N = (
    # de
    "beweise", "beweisen", "beweis", "zeige, dass", "zeige dass", "wahrscheinlichkeit", "gleichung",
    "gleichungen", "löse", "lösen", "berechne", "berechnen", "rechenweg", "schritt für schritt", "begründe",
    "begründung", "zinsen", "zinseszins", "prozent", "rabatt", "ableitung", "integral", "primzahl", "primzahlen",
    "irrational", "durchschnittsgeschwindigkeit", "teilbar", "rätsel", "logik", "winkel", "wie viele möglichkeiten",
    # fr
    "démontrer", "démontre", "démontrez", "prouver", "prouve", "prouvez", "preuve", "probabilité", "équation",
    "équations", "résous", "résoudre", "résolvez", "calcule", "calculer", "calculez", "étape par étape",
    "raisonnement", "justifie", "justifiez", "intérêts", "pour cent", "remise", "dérivée", "intégrale",
    "nombre premier", "nombres premiers", "irrationnel", "irrationnelle", "vitesse moyenne", "divisible",
    "énigme", "logique", "combien de façons", "combien de manières",
    # es
    "demuestra", "demostrar", "demuestre", "demostración", "probabilidad", "ecuación", "ecuaciones",
    "resuelve", "resolver", "resuelva", "calcula", "calcular", "paso a paso", "razona", "razonamiento",
    "justifica", "interés", "interés compuesto", "por ciento", "descuento", "derivada", "número primo",
    "números primos", "irracional", "velocidad media", "divisible", "acertijo", "lógica", "ángulos",
    "cuántas maneras", "muestra los pasos",
    # pt
    "prove que", "provar", "demonstre", "demonstração", "probabilidade", "equação", "equações", "resolva",
    "resolver", "calcule", "calcular", "passo a passo", "raciocínio", "justifique", "juros", "juros compostos",
    "por cento", "desconto", "derivada", "número primo", "números primos", "velocidade média", "divisível",
    "enigma", "lógica", "de quantas maneiras", "ímpares",
    # it
    "dimostra", "dimostrare", "dimostrazione", "probabilità", "equazione", "equazioni", "risolvi",
    "risolvere", "calcola", "calcolare", "passo dopo passo", "passo passo", "ragionamento", "ragiona",
    "giustifica", "interessi", "per cento", "sconto", "derivata", "integrale", "numero primo", "numeri primi",
    "irrazionale", "velocità media", "divisibile", "indovinello", "in quanti modi",
    # zh
    "证明", "概率", "几率", "方程", "解方程", "计算", "一步一步", "逐步", "推理", "推导", "利息", "利率",
    "百分之", "折扣", "导数", "积分", "素数", "质数", "无理数", "平均速度", "整除", "谜题", "逻辑", "多少种",
    # ja
    "証明", "確率", "方程式", "解いて", "計算", "順を追って", "ステップ", "推論", "論理", "利息", "金利",
    "割引", "導関数", "微分", "積分", "素数", "無理数", "平均速度", "割り切れ", "何通り",
)  # fmt: skip

_FAST_GREETINGS_I18N = (
    "guten morgen", "guten tag", "guten abend", "servus", "moin", "danke", "danke schön", "vielen dank",
    "tschüss", "salut", "bonsoir", "merci", "merci beaucoup", "au revoir", "buenos días", "buenas tardes",
    "buenas noches", "gracias", "muchas gracias", "adiós", "oi", "olá", "bom dia", "boa tarde", "boa noite",
    "obrigado", "obrigada", "tchau", "buongiorno", "buonasera", "grazie", "grazie mille", "arrivederci",
    "你好", "您好", "谢谢", "再见", "早上好", "こんにちは", "こんばんは", "おはよう", "ありがとう", "さようなら",
)  # fmt: skip

_CHAT_WORDS_I18N = (
    # de
    "warum", "wieso", "erkläre", "erklär", "beschreibe", "schreib", "schreibe", "formuliere", "übersetze",
    "zusammenfassung", "empfiehl", "empfehlen", "vorschlag", "ideen", "tipps", "meinung", "geschichte",
    "gedicht", "brief", "mail", "hilf mir", "fühle", "soll ich", "wie kann ich", "unterschied",
    # fr
    "pourquoi", "explique", "expliquer", "décris", "écris", "écrire", "rédige", "traduis", "résume",
    "recommande", "conseille", "conseil", "conseils", "idées", "avis", "histoire", "poème", "lettre",
    "aide-moi", "aider", "discours", "raconte", "avantages", "inconvénients", "comment puis-je",
    # es
    "por qué", "explica", "explícame", "describe", "escribe", "escríbeme", "redacta", "traduce", "resume",
    "recomienda", "recomiendas", "sugiere", "consejo", "consejos", "ideas", "opinión", "historia", "poema",
    "carta", "correo", "ayúdame", "siento", "debería", "cómo puedo",
    # pt
    "por que", "porque", "explique", "descreva", "escreva", "traduza", "resuma", "recomende", "sugira",
    "dicas", "conselho", "ideias", "opinião", "história", "carta", "mensagem", "me ajude", "pode me",
    "o que você acha", "prós e contras", "curiosidade", "me conta",
    # it
    "perché", "spiega", "spiegami", "descrivi", "scrivi", "scrivimi", "traduci", "riassumi", "consiglia",
    "consigliami", "consigli", "idee", "opinione", "storia", "poesia", "lettera", "aiutami", "mi aiuti",
    "racconta", "raccontami", "barzelletta",
    # zh
    "为什么", "解释", "描述", "写一", "写个", "写首", "写篇", "翻译", "总结", "推荐", "建议", "想法",
    "意见", "故事", "诗", "邮件",
    "帮我", "感觉", "怎么办", "区别",
    # ja
    "なぜ", "どうして", "説明", "書いて", "翻訳", "要約", "おすすめ", "アイデア", "アドバイス", "意見",
    "物語", "詩", "メール", "手伝", "どうすれば", "思いますか", "違い",
)  # fmt: skip


def _default_rules() -> dict[str, list[Rule]]:
    return {
        CODE: [
            Rule(CODE, keywords=_CODE_KEYWORDS + _CODE_KEYWORDS_I18N, file_extensions=_CODE_EXTENSIONS),
            Rule(CODE, patterns=_CODE_PATTERNS, pattern_weight=3.0),
            Rule(CODE, patterns=_CODE_SYNTAX),
        ],
        REASON: [
            Rule(REASON, keywords=_REASON_KEYWORDS + _REASON_KEYWORDS_I18N),
            Rule(REASON, patterns=_REASON_PATTERNS, pattern_weight=1.5, word_problems=True),
        ],
        FAST: [Rule(FAST, keywords=_FAST_GREETINGS + _FAST_GREETINGS_I18N)],
        # Conversational wording: too weak to win (0.5 < THRESHOLD), it keeps a short question
        # such as "why do cats purr?" from being sent to the fast model.
        CHAT: [Rule(CHAT, keywords=_CHAT_WORDS + _CHAT_WORDS_I18N, weight=0.5)],
    }


def merge_rules(rules: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Rule]]:
    """The defaults merged with rules from the spec (`replace_defaults` drops that category's defaults)."""
    merged = _default_rules()
    for category, rule in rules.items():
        extra = Rule(
            category,
            keywords=tuple(rule.get("keywords", ())),
            patterns=tuple((f"pattern {p!r}", p, ()) for p in rule.get("patterns", ())),
            file_extensions=tuple(rule.get("file_extensions", ())),
            weight=float(rule.get("weight", 1.0)),
        )
        if rule.get("replace_defaults"):
            merged[category] = [extra]
        else:
            merged.setdefault(category, []).append(extra)
    return merged


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
    if isinstance(content, dict):
        content = [content]  # one part on its own
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
        if not isinstance(kind, str):
            kind = "text" if isinstance(part.get("text"), str) else ""
        if kind in _TEXT_PARTS:
            value = part.get("text")
            if not isinstance(value, str):
                raise RequestError(f"{where}.content[{i}].text: must be a string")
            texts.append(value)
        elif kind in _IMAGE_PARTS:
            images += 1
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])  # a part of a kind not known here, with text: routed by its text
        # other parts (input_audio, files) carry no text to classify
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
        ollama_images = message.get("images")  # Ollama's shape: base64 pictures beside the content
        if isinstance(ollama_images, list):
            images += sum(1 for image in ollama_images if image)
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
        value = request["input"]
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            # the Responses API: `input` holds messages, `instructions` the system prompt
            return _parse_messages({"messages": value, "system": request.get("instructions")})
        return _parse_embeddings(value)
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
    text = "\n".join(_texts(request)).strip()
    if text:
        return ParsedRequest(text=text, shape="unknown")  # a shape not known here: routed by its text
    raise RequestError("request body has no `messages`, `prompt` or `input`")


_TEXT_KEYS = frozenset({"text", "content", "prompt", "query", "question", "message", "parts", "contents"})


def _texts(value: object, depth: int = 0) -> list[str]:
    """The strings under text-like keys (`text`, `content`, `parts` …) of a body of a shape not known here."""
    out: list[str] = []
    if depth > 20:
        return out
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in _TEXT_KEYS and isinstance(item, str):
                out.append(item)
            elif isinstance(item, (Mapping, list)):
                out.extend(_texts(item, depth + 1))
    elif isinstance(value, list):
        for item in value:
            out.extend(_texts(item, depth + 1))
    return out


# --------------------------------------------------------------------------- classifier


RULES = "rules"
EMBEDDING = "embedding"
"""The stages that can decide (`Classification.stage`)."""


@dataclass(frozen=True)
class Neighbour:
    """A labelled example near the request (the embedding stage), and how near (cosine similarity)."""

    category: str
    similarity: float
    text: str
    source: str = "built-in"
    """built-in, or spec (`routing.examples`)."""

    def to_json(self) -> dict[str, object]:
        return {
            "category": self.category,
            "similarity": round(self.similarity, 4),
            "text": self.text[:80],
            "source": self.source,
        }


@dataclass(frozen=True)
class Classification:
    """A category, the signals that decided it (best first), and every category's score.

    `confident` says whether the rules are sure (a strong, clear signal, or the request's shape);
    `stage` which stage decided (`rules` or `embedding`); `neighbours` the nearest labelled examples
    when the embedding stage was asked; `note` why it did not decide, when it was asked and the rules did.
    """

    category: str
    signals: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    confident: bool = True
    stage: str = RULES
    neighbours: tuple[Neighbour, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "category": str(self.category),
            "stage": self.stage,
            "rules_confident": self.confident,
            "signals": list(self.signals),
            "scores": {str(c): round(s, 3) for c, s in self.scores.items() if s},
        }
        if self.neighbours:
            out["neighbours"] = [n.to_json() for n in self.neighbours]
        if self.note:
            out["embedding_note"] = self.note
        return out


_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
"""Chinese characters and Japanese kana: scripts written without spaces between words."""
_CJK_RE = re.compile(f"[{_CJK_CHARS}]+")
_WORD_CHAR = f"[^\\W{_CJK_CHARS}]"
_TOKEN_RE = re.compile(f"(?:{_WORD_CHAR}|[#+$])+(?:['’.\\-/](?:{_WORD_CHAR}|[#+])+)*")
"""Words as the classifier sees them: `main.rs`, `docker-compose.yml`, `c++`, `don't`, `équation` are one word
each; Chinese and Japanese text is no word (its keywords are matched as substrings, `Classifier._cjk`)."""
_ASCII_TOKEN_RE = re.compile(r"[a-z0-9_#+$]+(?:['.\-/][a-z0-9_#+]+)*")
"""`_TOKEN_RE` for lowercased ASCII text (the same words, found faster)."""
CJK_CHARS_PER_WORD = 2
"""Chinese and Japanese text counts a word per this many characters (for `fast_max_words` and the like)."""
_MAX_PHRASE = 4
_NUMBER_WORDS = frozenset((
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "half", "twice", "double",
))  # fmt: skip
_QUANTITY_QUESTION = re.compile(
    r"\b(?:how (?:long|many|much|far|fast|old|often|tall|big|heavy|thick)|what time|at what|which day"
    r"|what day|which month|which year|what (?:was|is) the (?:original|total|final)|when (?:will|does|do|did|is)"
    # de, fr, es, pt, it
    r"|wie (?:lange|viel|viele|weit|schnell|alt|oft|hoch|groß)|wann|um wie viel uhr"
    r"|combien|en combien de temps|à quelle heure|quand"
    r"|cu[aá]nt[oa]s?|cu[aá]ndo|a qu[eé] hora|qu[eé] d[ií]a"
    r"|quant[oa]s?|quando|qual (?:foi|é|e|será) (?:o|a)|a que horas"
    r"|quant[oiea]|in quanto tempo|a che ora|quale giorno)\b"
    # zh, ja
    r"|多少|几[天个小点岁次]|多久|多长|多远|哪一天|什么时候|いくら|何[日時分個人回歳年]|どのくらい|いつ"
)
_FACT_QUESTION = re.compile(
    r"^\W*(?:q\s*:\s*)?(?:quick (?:question|one)\W*)?(?:what(?:'s|s)?(?! are)|who|whom|when|where|which|in what"
    r"|how (?:many|much|far|tall|old|long|big|heavy|deep|hot|cold|fast)"
    r"|is|are|was|were|does|do|did|can|yes or no|true or false"
    # de, fr, es, pt, it
    r"|wer|wann|wo|welche[rsnm]?|was ist|wie (?:viele|viel|hoch|alt|lang|weit|heißt)|ist|sind|hat"
    r"|qui|quand|où|quel(?:le)?s?|combien|est-ce que"
    r"|qu[eé]|qui[eé]n|cu[aá]ndo|d[oó]nde|cu[aá]l(?:es)?|cu[aá]nt[oa]s?|en qu[eé]"
    r"|qual|quais|quem|quando|onde|quant[oa]s?|em que"
    r"|chi|quale|quali|dove|quant[oiea]|in che)\b"
)
"""A question that asks for a fact: what, who, when, where, which, how many …, is/are/does …, yes or no."""
FACT_MAX_WORDS = 12
"""A factual question this short, with no other signal, is `fast` (but not for sure: the embedding stage may differ)."""
CONFIDENT_SCORE = 1.5
"""The rules are sure of a category that scores at least this …"""
CONFIDENT_MARGIN = 1.0
"""… and leads the next category by at least this; anything else is unsure (the embedding stage asks examples)."""
SCAN_HEAD = 1500
SCAN_TAIL = 500
"""A long request is read at its start and its end (a pasted file with the question after it):
classification stays microseconds whatever the size."""
WORD_PROBLEM_NUMBERS = 2
"""A word problem has at least this many numbers (digits or words) and a quantity question."""


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def _without_accents(text: str) -> str:
    """`text` with the accents taken off Latin letters (é → e, ñ → n, ç → c); the same text when it has none."""
    if text.isascii() or _CJK_RE.search(text):
        return text
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


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
        rules: Mapping[str, Sequence[Rule]],
        default_category: str = CHAT,
        fast_max_words: int = 6,
    ) -> None:
        self.default_category = default_category
        self.fast_max_words = fast_max_words
        self._words: dict[str, list[Signal]] = {}
        self._phrases: dict[tuple[str, ...], list[Signal]] = {}
        self._phrase_sizes: dict[str, list[int]] = {}
        """First word of a phrase → the lengths of the phrases starting with it."""
        self._extensions: dict[str, list[Signal]] = {}
        self._cjk: dict[str, list[Signal]] = {}
        """Keywords in Chinese or Japanese script: matched as substrings (no spaces to find words by)."""
        self._patterns: list[_Pattern] = []
        self._word_problems: list[Signal] = []
        self._made: dict[tuple[str, str, float], Signal] = {}
        for category, category_rules in rules.items():
            for rule in category_rules:
                self._add(category, rule)

    def _signal(self, category: str, label: str, weight: float) -> Signal:
        key = (category, label, weight)
        if key not in self._made:
            self._made[key] = Signal(category, label, weight)
        return self._made[key]

    def _add(self, category: str, rule: Rule) -> None:
        for keyword in rule.keywords:
            lowered = keyword.lower().strip()
            if not lowered:
                continue
            signal = self._signal(category, f"keyword '{lowered}'", rule.weight)
            if _CJK_RE.search(lowered):
                self._cjk.setdefault(lowered, []).append(signal)
                continue
            for variant in dict.fromkeys((lowered, _without_accents(lowered))):
                words = tuple(_tokens(variant))[:_MAX_PHRASE]
                if not words:
                    continue
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
                raise RequestError(f"routing.rules.{category}: bad pattern {pattern!r}: {exc}") from None
            signal = self._signal(category, label, rule.weight * rule.pattern_weight)
            self._patterns.append(_Pattern(regex, prefilter, signal))
        if rule.word_problems:
            label = "word problem (numbers and a quantity question)"
            self._word_problems.append(self._signal(category, label, rule.weight))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> Classifier:
        """The defaults merged with the config's `rules`, and its default category and fast limit.

        `config` is the JSON-able form of the spec's `routing` section (`controller.core.routing.routing_config`)::

            {"rules": {CATEGORY: {"keywords": [...], "patterns": [...], "file_extensions": [...],
                                  "weight": 1.0, "replace_defaults": false}},
             "default_category": "chat", "fast_max_words": 6}
        """
        config = config or {}
        return cls(
            merge_rules(config.get("rules") or {}),
            str(config.get("default_category") or CHAT),
            int(config.get("fast_max_words", 6)),
        )

    def _signals(self, text: str) -> tuple[list[Signal], int]:
        """Every signal found in `text` (repeats included), and its number of words (of the part read)."""
        if len(text) > SCAN_HEAD + SCAN_TAIL:
            text = text[:SCAN_HEAD] + "\n" + text[-SCAN_TAIL:]
        lowered = text.lower()
        ascii_only = lowered.isascii()
        tokens = (_ASCII_TOKEN_RE if ascii_only else _TOKEN_RE).findall(lowered)
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
            elif "-" in token:  # a compound (Docker-Container, CSV-Datei): its parts
                for part in token.split("-"):
                    signals = words.get(part)
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
        cjk = None if ascii_only else _CJK_RE.findall(text)
        if cjk:
            n += (sum(map(len, cjk)) + CJK_CHARS_PER_WORD - 1) // CJK_CHARS_PER_WORD
            for phrase, signals in self._cjk.items():
                if phrase in lowered:
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
            return Classification(VISION, (f"{n} image part{'s' if n != 1 else ''} in the messages",))
        if parsed.embed:
            return Classification(EMBED, ("embeddings request (`input`)",))
        if not parsed.text:
            return Classification(self.default_category, ("token ids only: nothing to read",))
        found, words = self._signals(parsed.text)
        short = words <= self.fast_max_words
        # (signal, counts as) — each signal once; context counts CONTEXT_WEIGHT of its weight
        votes: dict[Signal, float] = {}
        for signal in found:
            if signal.category == FAST and not short:
                continue  # greetings only mean `fast` in a short message ("hi!", not "Hi! I'm setting up …")
            votes[signal] = signal.weight
        if parsed.context:
            for signal in self._signals(parsed.context)[0]:
                if signal.category != FAST and signal not in votes:
                    votes[signal] = signal.weight * CONTEXT_WEIGHT
        scores: dict[str, float] = {}
        for signal, weight in votes.items():
            scores[signal.category] = scores.get(signal.category, 0.0) + weight
        best: str | None = None
        for category in (*TIE_ORDER, *(c for c in scores if c not in TIE_ORDER)):
            score = scores.get(category, 0.0)
            if score >= THRESHOLD and (best is None or score > scores[best] + 1e-9):
                best = category
        if best is not None:
            top = scores[best]
            second = max((v for c, v in scores.items() if c != best), default=0.0)
            sure = top >= CONFIDENT_SCORE and top - second >= CONFIDENT_MARGIN
            return Classification(best, _explain(best, votes), scores, confident=sure)
        chatty = scores.get(CHAT, 0.0) > 0.0
        if short and not chatty:
            s = "s" if words != 1 else ""
            why = f"short prompt: {words} word{s} ≤ {self.fast_max_words}"
            return Classification(FAST, (why,), scores, confident=False)
        lowered = parsed.text.lower()
        limit = FACT_MAX_WORDS * 2 if lowered.lstrip().startswith(("yes or no", "true or false")) else FACT_MAX_WORDS
        if words <= limit and not chatty and _FACT_QUESTION.match(lowered):
            why = f"short factual question: {words} words ≤ {limit}"
            return Classification(FAST, (why,), scores, confident=False)
        why_default = _explain(self.default_category, votes)
        return Classification(
            self.default_category, (*why_default, "no stronger signal: default category"), scores, confident=False
        )


def _explain(category: str, votes: Mapping[Signal, float]) -> tuple[str, ...]:
    """The signals that voted for `category`, strongest first (context marked as such)."""
    ranked = sorted(((s, w) for s, w in votes.items() if s.category == category), key=lambda sw: -sw[1])
    return tuple(
        s.label if w >= s.weight else f"{s.label} (in the system prompt or an earlier turn)" for s, w in ranked
    )


# --------------------------------------------------------------------------- the embedding stage

TEXT_CATEGORIES = (CODE, REASON, CHAT, FAST)
"""The categories examples teach: `vision` and `embed` are decided by the request's shape."""
EMBEDDING_BUDGET = 0.05
"""Seconds per request for the embedding stage (`routing.embedding_budget`); past it the rules decide."""
KNN_K = 21
"""How many nearest examples vote."""
KNN_POWER = 2.0
"""Each of them votes its cosine similarity to this power (nearer examples count more)."""
RULES_PRIOR = 0.75
"""How much the unsure rules count against the neighbours' vote (`fuse`) …"""
RULES_PICK = 1.0
"""… where the category the rules picked gets this much on top of its score.

`KNN_K`, `KNN_POWER`, `RULES_PRIOR` and `RULES_PICK` were chosen by 5-fold cross-validation on the
built-in examples only (3 shuffles, all-MiniLM-L6-v2); the held-out sets took no part."""
RETRY_AFTER = 10.0
"""After the embed model failed (down, slow, bad answer) `PAUSE_AFTER` times in a row, this many seconds of
rules only, then try again."""
PAUSE_AFTER = 3
"""Failures in a row before the stage pauses: one slow answer (a busy machine) does not stop it, a model
that is down or keeps missing the budget does."""
PREPARE_TIMEOUT = 60.0
"""How long embedding the examples may take (once per embed model and example set)."""
EMBED_CHARS = 2000
"""A request is embedded by its first this many characters of the last user message."""


@dataclass(frozen=True)
class Example:
    """A labelled request: built in (`routing_examples.jsonl`) or from the spec (`routing.examples`)."""

    text: str
    category: str
    source: str = "built-in"


EXAMPLES_FILE = "routing_examples.jsonl"
"""The built-in examples (`controller/core/`), one `{"request": ..., "category": ...}` a line."""


def examples_from_rows(rows: Sequence[Mapping[str, Any]], source: str = "built-in") -> list[Example]:
    """The text examples of labelled rows (`request` or `text`, and `category`); vision and embed rows are left out."""
    out: list[Example] = []
    for row in rows:
        category = str(row.get("category"))
        if category not in TEXT_CATEGORIES:
            continue
        text = row["text"] if "text" in row else parse_request(row.get("request")).text
        if str(text).strip():
            out.append(Example(str(text), category, source))
    return out


def examples_hash(examples: Sequence[Example]) -> str:
    """What identifies an example set's embeddings (with the embed model): its texts, in order."""
    import hashlib

    doc = json.dumps([e.text for e in examples], ensure_ascii=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class EmbedError(RuntimeError):
    """The embed model did not give vectors (down, slow, a bad answer): one line."""


Embedder = Any
"""A callable `(texts, timeout_s) -> list of vectors` (`openai_embedder`, or a test's)."""


def openai_embedder(base_url: str, model: str, api_key: str | None = None) -> Embedder:
    """Embeddings from an OpenAI-compatible `POST {base_url}/embeddings` (llama-server, Ollama's `/v1`, LiteLLM)."""
    import urllib.error
    import urllib.request

    url = base_url.rstrip("/") + "/embeddings"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def embed(texts: Sequence[str], timeout: float) -> list[list[float]]:
        data = json.dumps({"model": model, "input": list(texts)}).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=max(timeout, 0.001)) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise EmbedError(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EmbedError(f"{url}: {reason}") from None
        except ValueError:
            raise EmbedError(f"{url}: the answer is not JSON") from None
        try:
            items = sorted(body["data"], key=lambda d: int(d.get("index", 0)))
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (KeyError, TypeError, ValueError):
            raise EmbedError(f"{url}: the answer has no `data[].embedding`") from None
        if len(vectors) != len(texts):
            raise EmbedError(f"{url}: {len(vectors)} vectors for {len(texts)} inputs")
        return vectors

    return embed


def _unit(vector: Sequence[float]) -> list[float]:
    import math

    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    import operator

    return float(sum(map(operator.mul, a, b)))


def fuse(
    neighbours: Sequence[Neighbour],
    first: Classification,
    power: float = KNN_POWER,
    prior: float = RULES_PRIOR,
    pick: float = RULES_PICK,
) -> tuple[str, dict[str, float]] | None:
    """The category of a request the rules were unsure of (`first`): the nearest examples' vote, the rules a prior.

    Each neighbour votes its similarity ** `power`, and the votes are shares (they add up to 1);
    each text category then gets `prior` × its rules score (the rules' pick + `pick`) / (1 + all of them):
    the unsure rules weigh up to `prior` against the neighbours' 1, so they win a split vote and lose
    a clear one. None when no neighbour is similar at all.
    """
    votes: dict[str, float] = {}
    for n in neighbours:
        if n.similarity > 0:
            votes[n.category] = votes.get(n.category, 0.0) + n.similarity**power
    total = sum(votes.values())
    if total <= 0:
        return None
    rules = {c: s for c, s in first.scores.items() if c in TEXT_CATEGORIES and s > 0}
    if first.category in TEXT_CATEGORIES:
        rules[first.category] = rules.get(first.category, 0.0) + pick
    scale = prior / (1.0 + sum(rules.values()))
    fused = {c: votes.get(c, 0.0) / total + scale * rules.get(c, 0.0) for c in {*votes, *rules}}
    best = max(fused, key=lambda c: (fused[c], -TIE_ORDER.index(c) if c in TIE_ORDER else -len(TIE_ORDER)))
    return best, fused


_VECTORS: dict[tuple[str, str], list[list[float]]] = {}
"""Example embeddings by (embed model key, example-set hash), shared by every stage in this process."""


class EmbeddingStage:
    """The second stage: the nearest labelled examples by embedding, for requests the rules are unsure of.

    `embed` turns texts into vectors (the cluster's `embed` model through `openai_embedder`); `key`
    names the embed model (its URL and name), so that example embeddings are computed once per
    model and example set (in memory, and in `cache_path` when given). A request gets `budget`
    seconds for its own embedding and the vote; when the embed model is down, slow or not ready, the
    stage answers nothing and says why, and the rules decide.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        embed: Embedder,
        key: str,
        budget: float = EMBEDDING_BUDGET,
        k: int = KNN_K,
        cache_path: str | None = None,
        clock: Any = None,
    ) -> None:
        import time

        self.examples = list(examples)
        self.embed = embed
        self.key = key
        self.budget = budget
        self.k = k
        self.cache_path = cache_path
        self.hash = examples_hash(self.examples)
        self.clock = clock or time.monotonic
        self._pool: Any = None
        self._preparing: Any = None
        self._paused_until = 0.0
        self._failures = 0
        self.last_error = ""

    # -- example embeddings

    @property
    def ready(self) -> bool:
        return (self.key, self.hash) in _VECTORS

    def _load_cache(self) -> bool:
        if not self.cache_path:
            return False
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                doc = json.load(f)
            if doc.get("key") != self.key or doc.get("hash") != self.hash:
                return False
            vectors = [[float(x) for x in v] for v in doc["vectors"]]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if len(vectors) != len(self.examples):
            return False
        _VECTORS[self.key, self.hash] = vectors
        return True

    def _save_cache(self, vectors: list[list[float]]) -> None:
        if not self.cache_path:
            return
        import os
        import tempfile

        directory = os.path.dirname(self.cache_path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".routing-embeddings.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": self.key, "hash": self.hash, "vectors": vectors}, f)
            os.replace(tmp, self.cache_path)
        except OSError:
            pass  # a cache that cannot be written only costs embedding the examples again

    def prepare(self, timeout: float = PREPARE_TIMEOUT) -> str:
        """Embed the examples now (or load them from the cache); '' when ready, else why not."""
        if self.ready or self._load_cache():
            return ""
        if not self.examples:
            return "no examples"
        import time

        deadline = time.monotonic() + timeout
        vectors: list[list[float]] = []
        try:
            for i in range(0, len(self.examples), 32):
                batch = [e.text[:EMBED_CHARS] for e in self.examples[i : i + 32]]
                vectors.extend(_unit(v) for v in self.embed(batch, max(deadline - time.monotonic(), 0.001)))
        except EmbedError as exc:
            self.last_error = str(exc)
            return f"embedding the examples failed: {exc}"
        _VECTORS[self.key, self.hash] = vectors
        self._save_cache(vectors)
        return ""

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="homelab-embed")
        return self._pool

    def start(self) -> None:
        """Embed the examples in the background (at most one job at a time)."""
        if self.ready or (self._preparing is not None and not self._preparing.done()):
            return
        self._preparing = self._executor().submit(self.prepare)

    # -- one request

    def nearest(self, text: str) -> tuple[tuple[Neighbour, ...], str]:
        """The k nearest examples of `text` within the budget, or () and why not."""
        from concurrent.futures import TimeoutError as FutureTimeout

        start = self.clock()
        if start < self._paused_until:
            return (), f"embed model failed {self.last_error and '(' + self.last_error + ') '}recently: rules decide"
        vectors = _VECTORS.get((self.key, self.hash))
        if vectors is None:
            if not self._load_cache():
                self.start()
                return (), "example embeddings not ready yet (being computed): rules decide"
            vectors = _VECTORS[self.key, self.hash]
        future = self._executor().submit(self.embed, [text[:EMBED_CHARS]], self.budget)
        try:
            query = _unit(future.result(timeout=max(self.budget - (self.clock() - start), 0.0))[0])
        except FutureTimeout:
            self._fail(f"no answer within {self.budget * 1000:.0f} ms")
            return (), f"embed model gave no answer within {self.budget * 1000:.0f} ms: rules decide"
        except EmbedError as exc:
            self._fail(str(exc))
            return (), f"embed model failed ({exc}): rules decide"
        if len(query) != len(vectors[0]):
            self._fail("vector size changed")
            return (), "the embed model's vectors changed size: rules decide"
        self._failures = 0
        scored = sorted(((_cosine(query, v), i) for i, v in enumerate(vectors)), key=lambda si: (-si[0], si[1]))[
            : self.k
        ]
        if self.clock() - start > self.budget:
            return (), f"embedding stage took over {self.budget * 1000:.0f} ms: rules decide"
        examples = self.examples
        return tuple(Neighbour(examples[i].category, s, examples[i].text, examples[i].source) for s, i in scored), ""

    def _fail(self, why: str) -> None:
        self.last_error = why
        self._failures += 1
        if self._failures >= PAUSE_AFTER:
            self._failures = 0
            self._paused_until = self.clock() + RETRY_AFTER


class TwoStageClassifier:
    """The rules first; for a request they are unsure of, the nearest labelled examples (`EmbeddingStage`)."""

    def __init__(self, rules: Classifier, stage: EmbeddingStage | None = None) -> None:
        self.rules = rules
        self.stage = stage

    def classify(self, request: object) -> Classification:
        parsed = parse_request(request)
        first = self.rules.classify(parsed)
        if first.confident or self.stage is None or not parsed.text.strip():
            return first
        return self.second(parsed, first)

    def second(self, parsed: ParsedRequest, first: Classification) -> Classification:
        """Ask the embedding stage about a request the rules were unsure of (`first`)."""
        assert self.stage is not None
        neighbours, note = self.stage.nearest(parsed.text)
        if not neighbours:
            return _with(first, note=note)
        fused = fuse(neighbours, first)
        if fused is None:
            return _with(first, neighbours=neighbours, note="no example is similar at all: rules decide")
        category, scores = fused
        near = ", ".join(f"{n.category} {n.similarity:.2f}" for n in neighbours[:3])
        vote = ", ".join(f"{c} {v:.2f}" for c, v in sorted(scores.items(), key=lambda cv: -cv[1])[:2])
        why = (
            f"nearest examples: {near}",
            f"vote of {len(neighbours)} examples with the rules as a prior: {vote}",
            *(f"rules (unsure, {first.category}): {s}" for s in first.signals[:2]),
        )
        return Classification(category, why, first.scores, False, EMBEDDING, neighbours)


def _with(c: Classification, **changes: Any) -> Classification:
    import dataclasses

    return dataclasses.replace(c, **changes)


# --------------------------------------------------------------------------- the LiteLLM plugin

PLUGIN_MODULE = "homelab_router"
"""The file (`homelab_router.py`) written next to the LiteLLM config, and the module the config names."""
PLUGIN_OBJECT = "classifier"
"""The plugin instance in that module: `classifier_plugin: homelab_router.classifier`."""


class LiteLLMClassifier:
    """The LiteLLM proxy's classifier plugin: the same classifier as `homelab route`.

    LiteLLM mechanism (1.108): the built-in complexity router. The config's `auto` model is
    `model: auto_router/complexity_router` with `complexity_router_config: {classifier_type: custom,
    classifier_plugin: homelab_router.classifier, tier_definitions, fallback_tier, tiers}`; the proxy
    loads `homelab_router.py` from the config's directory (`get_instance_fn`), checks that
    `classify` is a coroutine function, and for each request to `auto` awaits
    `classify(context)` with a `litellm.types.router.RoutingContext`. Its `raw_messages` carry the
    request in chat form for every API the router serves (the chat `messages`, system prompt
    included, and the `prompt` of `/v1/completions` as a user message). The returned tier names
    the model group that serves: one tier per category, `tiers: {code: expert/code, ...}`.
    Because `auto` is a model of the config, it is listed in `/v1/models` (a pre-call hook
    loaded through `litellm_settings.callbacks` would route too, but leaves `auto` unlisted).

    `config`: {"routing": (see `Classifier.from_config`), "tiers": {category: tier},
    "fallback_tier": tier}. A category without a tier of its own was already mapped by homelab
    to the tier of its fallback category; a request that cannot be classified, or anything
    unexpected, goes to `fallback_tier` (this plugin never fails a request).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        routing = config.get("routing") or {}
        self.classifier = Classifier.from_config(routing)
        self.tiers: dict[str, str] = {str(k): str(v) for k, v in (config.get("tiers") or {}).items()}
        self.fallback_tier = str(config["fallback_tier"])
        self.last: Classification | None = None
        """The latest classification (for tests and debugging)."""
        stage: EmbeddingStage | None = None
        embedding = config.get("embedding")
        if embedding and routing.get("embedding", True):
            examples = [Example(str(t), str(c), str(src)) for t, c, src in embedding.get("examples") or ()]
            url, model = str(embedding["url"]), str(embedding["model"])
            budget = float(routing.get("embedding_budget", EMBEDDING_BUDGET))
            stage = EmbeddingStage(examples, openai_embedder(url, model), f"{url}#{model}", budget)
        self.two = TwoStageClassifier(self.classifier, stage)

    def tier_for(self, body: object) -> str:
        """The tier (model group) of a request body: its category's, else the fallback tier (both stages)."""
        try:
            self.last = self.two.classify(body)
        except RequestError:
            return self.fallback_tier
        return self.tiers.get(self.last.category, self.fallback_tier)

    async def classify(self, context: Any) -> str | None:
        messages = getattr(context, "raw_messages", None) or getattr(context, "structured_messages", None)
        if not messages:
            return self.fallback_tier
        body = {"messages": [dict(m) for m in messages if isinstance(m, Mapping)]}
        try:
            parsed = parse_request(body)
            first = self.classifier.classify(parsed)
        except RequestError:
            return self.fallback_tier
        self.last = first
        if not first.confident and self.two.stage is not None and parsed.text.strip():
            import asyncio

            # the embed model is asked off the event loop, within the stage's budget
            self.last = await asyncio.to_thread(self.two.second, parsed, first)
        return self.tiers.get(self.last.category, self.fallback_tier)


def plugin_source(config: Mapping[str, Any]) -> str:
    """The text of `homelab_router.py`: this module's source, then the plugin built from `config`."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    doc = json.dumps(config, sort_keys=True, ensure_ascii=True)
    future = "from __future__ import annotations\n"
    head, _, body = source.partition(future)
    return (
        "# Written by homelab (controller/core/classifier.py and the spec's routing rules): the classifier\n"
        "# plugin of the LiteLLM config next to it. Edits here are replaced on the next `homelab reconcile`.\n"
        + head
        + future
        + _REGISTER
        + body
        + f"\n\n{PLUGIN_OBJECT} = LiteLLMClassifier(json.loads({doc!r}))\n"
    )


_REGISTER = """
import sys as _sys


class _ThisModule:  # LiteLLM executes this file without putting it in sys.modules, where dataclasses look
    def __init__(self, namespace: dict[str, object]) -> None:
        self.__dict__ = namespace


_sys.modules.setdefault(__name__, _ThisModule(globals()))  # type: ignore[arg-type]
"""
