"""SQL text handling shared by both capture paths: lexing, splitting, classifying, hashing.

The lexer follows PostgreSQL's own lexical rules closely enough for three jobs:
split a workload file into statements (psql-like: `;` ends a statement unless it
is inside a string, quoted identifier, dollar quote, comment or a
`BEGIN ATOMIC … END` function body), classify a statement so capture knows how
safely it may run, and normalize a statement into a fingerprint text for the
fallback query hash. It is not a parser: classification looks only at keywords.

Fallback query hash (used when the server does not give a query identifier):
`sha256(normalize_statement(text)).hexdigest()`, where normalization drops
comments, lowercases unquoted words (PostgreSQL folds them anyway), replaces
every constant and `$n` parameter with `?`, folds a leading minus into the
constant, squashes constant lists in `IN (…)` / `ARRAY[…]` to one `?` (as
PostgreSQL 18's query jumbling does), drops trailing semicolons and joins the
tokens with single spaces.
"""

import enum
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final


class Tok(enum.Enum):
    WORD = "word"  # keyword or unquoted identifier
    QIDENT = "qident"  # "quoted identifier"
    STRING = "string"  # '…', E'…', B'…', X'…', N'…', U&'…'
    DOLLAR = "dollar"  # $tag$…$tag$
    NUMBER = "number"
    PARAM = "param"  # $1
    PUNCT = "punct"  # operators and punctuation, one character each
    SEMI = "semi"
    COMMENT = "comment"
    SPACE = "space"
    META = "meta"  # psql/pgbench backslash command, to the end of the line


@dataclass(frozen=True, slots=True)
class Token:
    kind: Tok
    text: str
    start: int
    end: int


_INSIGNIFICANT: Final = frozenset({Tok.SPACE, Tok.COMMENT})
_CONSTANTS: Final = frozenset({Tok.STRING, Tok.DOLLAR, Tok.NUMBER, Tok.PARAM})

_SPACE = re.compile(r"\s+")
# Identifier characters as PostgreSQL defines them: letters, `_`, any non-ASCII
# byte; digits and `$` after the first character.
_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_NUMBER = re.compile(
    r"0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+"
    r"|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?"
)
_PARAM = re.compile(r"\$\d+")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
# String prefixes: E'' honours backslash escapes; B'', X'', N'', U&'' do not.
_STRING_PREFIX = re.compile(r"(?:[eE]|[bBxXnN]|[uU]&)'")


def _quoted_end(text: str, pos: int, quote: str, backslash: bool) -> int:
    """Index just past the closing quote of a literal opened at `pos` (doubled quotes escape)."""
    i = pos + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < n and text[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return n  # unterminated: the rest is the literal; the server will report it


def _block_comment_end(text: str, pos: int) -> int:
    depth = 0
    i = pos
    n = len(text)
    while i < n:
        pair = text[i : i + 2]
        if pair == "/*":
            depth += 1
            i += 2
        elif pair == "*/":
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def tokenize(text: str) -> Iterator[Token]:
    """Every character of `text` belongs to exactly one token, so slices rebuild the source."""
    i = 0
    n = len(text)
    at_statement_start = True  # psql meta-commands are recognized only there
    while i < n:
        ch = text[i]
        kind: Tok
        if ch.isspace():
            m = _SPACE.match(text, i)
            assert m is not None
            end, kind = m.end(), Tok.SPACE
        elif text.startswith("--", i):
            nl = text.find("\n", i)
            end, kind = (n if nl < 0 else nl), Tok.COMMENT
        elif text.startswith("/*", i):
            end, kind = _block_comment_end(text, i), Tok.COMMENT
        elif ch == "\\" and at_statement_start:
            nl = text.find("\n", i)
            end, kind = (n if nl < 0 else nl), Tok.META
        elif ch == "'":
            end, kind = _quoted_end(text, i, "'", backslash=False), Tok.STRING
        elif ch == '"':
            end, kind = _quoted_end(text, i, '"', backslash=False), Tok.QIDENT
        elif (m := _STRING_PREFIX.match(text, i)) is not None:
            quote_at = m.end() - 1
            end, kind = _quoted_end(text, quote_at, "'", backslash=ch in "eE"), Tok.STRING
        elif text.startswith(('U&"', 'u&"'), i):
            end, kind = _quoted_end(text, i + 2, '"', backslash=False), Tok.QIDENT
        elif ch == "$":
            if (m := _PARAM.match(text, i)) is not None:
                end, kind = m.end(), Tok.PARAM
            elif (m := _DOLLAR_TAG.match(text, i)) is not None:
                tag = m.group(0)
                close = text.find(tag, m.end())
                end, kind = (n if close < 0 else close + len(tag)), Tok.DOLLAR
            else:
                end, kind = i + 1, Tok.PUNCT
        elif (m := _WORD.match(text, i)) is not None:
            end, kind = m.end(), Tok.WORD
        elif ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER.match(text, i)
            end, kind = (m.end() if m else i + 1), Tok.NUMBER
        elif ch == ";":
            end, kind = i + 1, Tok.SEMI
        else:
            end, kind = i + 1, Tok.PUNCT
        yield Token(kind, text[i:end], i, end)
        if kind is Tok.SEMI or kind is Tok.META:
            at_statement_start = True
        elif kind not in _INSIGNIFICANT:
            at_statement_start = False
        i = end


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a workload: its text without the terminating `;`, and where it started."""

    text: str
    index: int  # 0-based position in the workload
    line: int  # 1-based line of its first significant character


def _upper_words(tokens: list[Token]) -> list[str]:
    return [t.text.upper() for t in tokens if t.kind is Tok.WORD]


def _is_routine_definition(significant: list[Token]) -> bool:
    """CREATE [OR REPLACE] FUNCTION|PROCEDURE: its SQL-standard body may hold `;`."""
    words = _upper_words(significant[:5])
    if not words or words[0] != "CREATE":
        return False
    rest = words[1:]
    if rest[:2] == ["OR", "REPLACE"]:
        rest = rest[2:]
    return bool(rest) and rest[0] in ("FUNCTION", "PROCEDURE")


def split_statements(text: str) -> list[Statement]:
    """Split a workload the way psql would; comment-only pieces are dropped."""
    statements: list[Statement] = []
    current: list[Token] = []
    significant: list[Token] = []
    atomic_depth = 0  # BEGIN ATOMIC … END nesting inside a routine definition

    def flush() -> None:
        nonlocal atomic_depth
        if significant:
            first, last = significant[0], significant[-1]
            line = text.count("\n", 0, first.start) + 1
            statements.append(Statement(text[first.start : last.end], len(statements), line))
        current.clear()
        significant.clear()
        atomic_depth = 0

    for token in tokenize(text):
        if token.kind is Tok.META:
            flush()  # a meta-command stands alone, like in psql
            significant.append(token)
            flush()
            continue
        if token.kind is Tok.SEMI and atomic_depth == 0:
            flush()
            continue
        current.append(token)
        if token.kind in _INSIGNIFICANT:
            continue
        significant.append(token)
        if token.kind is Tok.WORD and _is_routine_definition(significant):
            word = token.text.upper()
            # psql counts CASE too, since CASE … END would otherwise close the body early.
            if word in ("BEGIN", "CASE"):
                atomic_depth += 1
            elif word == "END" and atomic_depth > 0:
                atomic_depth -= 1
    flush()
    return statements


class StatementKind(enum.Enum):
    SELECT = "select"  # read-only query: runs in a READ ONLY transaction
    LOCKING_SELECT = "locking_select"  # SELECT … FOR UPDATE/SHARE: read-write txn, rolled back
    DML = "dml"  # INSERT/UPDATE/DELETE/MERGE (or a WITH that contains one): rolled back
    CTAS = "ctas"  # CREATE TABLE AS / SELECT INTO / CREATE MATERIALIZED VIEW AS: plain EXPLAIN only
    DDL = "ddl"  # never executed, never explained
    OTHER = "other"  # utility statements EXPLAIN cannot take

    @property
    def query_type(self) -> str:
        return _QUERY_TYPES[self]


_QUERY_TYPES: Final = {
    StatementKind.SELECT: "SELECT",
    StatementKind.LOCKING_SELECT: "SELECT",
    StatementKind.DML: "DML",
    StatementKind.CTAS: "DDL",
    StatementKind.DDL: "DDL",
    StatementKind.OTHER: "OTHER",
}


@dataclass(frozen=True, slots=True)
class Classification:
    kind: StatementKind
    verb: str  # the leading keyword, upper case ("" when there is none)


_SELECT_VERBS: Final = frozenset({"SELECT", "VALUES", "TABLE"})
_DML_VERBS: Final = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
_DDL_VERBS: Final = frozenset(
    {"CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "SECURITY", "IMPORT", "REFRESH", "REASSIGN"}
)
_CTAS_TARGETS: Final = frozenset({"TABLE", "VIEW"})  # CREATE … TABLE … AS, CREATE MATERIALIZED VIEW … AS
_QUERY_STARTS: Final = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "EXECUTE"})


def _significant(text: str) -> list[Token]:
    return [t for t in tokenize(text) if t.kind not in _INSIGNIFICANT]


def _has_locking_clause(words: list[str]) -> bool:
    # FOR UPDATE | FOR NO KEY UPDATE | FOR SHARE | FOR KEY SHARE
    return any(
        w == "FOR" and i + 1 < len(words) and words[i + 1] in ("UPDATE", "SHARE", "NO", "KEY")
        for i, w in enumerate(words)
    )


def _has_data_modification(words: list[str]) -> bool:
    for i, w in enumerate(words):
        if w in ("INSERT", "DELETE", "MERGE"):
            return True
        # UPDATE after FOR / KEY is a locking clause, not a statement
        if w == "UPDATE" and (i == 0 or words[i - 1] not in ("FOR", "KEY")):
            return True
    return False


def _is_ctas(tokens: list[Token]) -> bool:
    """CREATE [opts] TABLE|MATERIALIZED VIEW name … AS <query> with AS outside parentheses."""
    words = _upper_words(tokens[:12])
    head = words[: words.index("AS")] if "AS" in words else words
    if not any(w in _CTAS_TARGETS for w in head):
        return False
    if "VIEW" in head and "MATERIALIZED" not in head:
        return False  # plain views are not explainable
    depth = 0
    for i, t in enumerate(tokens):
        if t.text in ("(", "["):
            depth += 1
        elif t.text in (")", "]"):
            depth -= 1
        elif depth == 0 and t.kind is Tok.WORD and t.text.upper() == "AS":
            after = tokens[i + 1] if i + 1 < len(tokens) else None
            return after is not None and (after.text == "(" or after.text.upper() in _QUERY_STARTS)
    return False


def classify(text: str) -> Classification:
    tokens = _significant(text)
    if tokens and tokens[0].kind is Tok.META:
        return Classification(StatementKind.OTHER, "\\")
    while tokens and tokens[0].text == "(":  # (SELECT …) UNION (SELECT …)
        tokens = tokens[1:]
    if not tokens or tokens[0].kind is not Tok.WORD:
        return Classification(StatementKind.OTHER, "")
    verb = tokens[0].text.upper()
    words = _upper_words(tokens)
    if verb in _SELECT_VERBS or verb == "WITH":
        if verb == "WITH" and _has_data_modification(words):
            return Classification(StatementKind.DML, verb)
        if "INTO" in words:  # SELECT … INTO new_table creates a table
            return Classification(StatementKind.CTAS, verb)
        if _has_locking_clause(words):
            return Classification(StatementKind.LOCKING_SELECT, verb)
        return Classification(StatementKind.SELECT, verb)
    if verb in _DML_VERBS:
        return Classification(StatementKind.DML, verb)
    if verb == "CREATE" and _is_ctas(tokens):
        return Classification(StatementKind.CTAS, verb)
    if verb in _DDL_VERBS:
        return Classification(StatementKind.DDL, verb)
    return Classification(StatementKind.OTHER, verb)


_EXPLAIN_OPTION_WORDS: Final = frozenset({"ANALYZE", "ANALYSE", "VERBOSE"})


def strip_explain(text: str) -> str:
    """`EXPLAIN [ANALYZE] [VERBOSE] | EXPLAIN (…) stmt` → `stmt`; other text unchanged.

    auto_explain logs the plan of an `EXPLAIN ANALYZE …` with the EXPLAIN in its
    query text; the statement inside is what should be classified.
    """
    tokens = _significant(text)
    if not tokens or tokens[0].text.upper() != "EXPLAIN":
        return text
    i = 1
    if i < len(tokens) and tokens[i].text == "(":
        depth = 0
        while i < len(tokens):
            depth += {"(": 1, ")": -1}.get(tokens[i].text, 0)
            i += 1
            if depth == 0:
                break
    while i < len(tokens) and tokens[i].text.upper() in _EXPLAIN_OPTION_WORDS:
        i += 1
    return text[tokens[i].start :] if i < len(tokens) else text


# Keywords after which `-` starts a negative constant rather than a subtraction.
_SIGN_CONTEXT: Final = frozenset(
    {"SELECT", "WHERE", "AND", "OR", "NOT", "THEN", "ELSE", "WHEN", "RETURNING", "VALUES", "BY", "LIMIT",
     "OFFSET", "BETWEEN", "IN", "IS", "LIKE", "ILIKE", "ON", "SET", "CASE", "ANY", "ALL", "FETCH"}
)  # fmt: skip


def _starts_negative_constant(prev: Token | None) -> bool:
    if prev is None:
        return True
    if prev.kind is Tok.PUNCT:
        return prev.text not in (")", "]")
    return prev.kind is Tok.WORD and prev.text.upper() in _SIGN_CONTEXT


def _normalized_tokens(text: str) -> list[str]:
    out: list[str] = []
    sign: list[bool] = []  # parallel to `out`: is this a `-` that may be a constant's sign?
    prev: Token | None = None
    for token in _significant(text):
        if token.kind in _CONSTANTS:
            if sign and sign[-1]:
                out.pop()  # -1 is one constant, as in pg_stat_statements
                sign.pop()
            out.append("?")
            sign.append(False)
        else:
            out.append(token.text.lower() if token.kind is Tok.WORD else token.text)
            sign.append(token.text == "-" and _starts_negative_constant(prev))
        prev = token
    while out and out[-1] == ";":
        out.pop()
    return out


def _squash_constant_lists(tokens: list[str]) -> list[str]:
    """`in ( ? , ? , ? )` → `in ( ? )`; `array [ ? , ? ]` → `array [ ? ]`."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        out.append(tokens[i])
        opener = {"(": ")", "[": "]"}.get(tokens[i])
        if opener and len(out) >= 2 and out[-2] in ("in", "array"):
            j = i + 1
            while j + 1 < len(tokens) and tokens[j] == "?" and tokens[j + 1] == ",":
                j += 2
            if j + 1 < len(tokens) and tokens[j] == "?" and tokens[j + 1] == opener and j > i + 1:
                out.extend(["?", opener])
                i = j + 2
                continue
        i += 1
    return out


def normalize_statement(text: str) -> str:
    return " ".join(_squash_constant_lists(_normalized_tokens(text)))


def text_hash(text: str) -> str:
    """The fallback query hash: sha256 hex digest of the normalized statement."""
    return hashlib.sha256(normalize_statement(text).encode()).hexdigest()
