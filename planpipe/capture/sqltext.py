"""SQL text handling shared by both capture paths: splitting, classifying, hashing.

Splitting and classification use PostgreSQL's own scanner and parser through
pglast (libpg_query, the parser pganalyze uses): a workload is split psql-like
(`;` ends a statement unless it is inside a string, quoted identifier, dollar
quote, comment or a `BEGIN ATOMIC … END` routine body; a backslash command
stands alone), and each statement is parsed to learn what it is (SELECT, DML,
CREATE TABLE AS, DDL, utility) and which functions and relations it touches
anywhere in its tree: subqueries, CTEs, LATERAL, nested calls. The capture
agent decides from that how safely a statement may run (see `capture.safety`).

Fallback query hash (used when the server does not give a query identifier):
`sha256(normalize_statement(text)).hexdigest()`, where normalization drops
comments, lowercases unquoted words (PostgreSQL folds them anyway), replaces
every constant and `$n` parameter with `?`, folds a leading minus into the
constant, squashes constant lists in `IN (…)` / `ARRAY[…]` to one `?` (as
PostgreSQL 18's query jumbling does), drops trailing semicolons and joins the
tokens with single spaces. The small tokenizer below exists only for this
hash: it defines the hash's token boundaries (one token per punctuation
character), and changing them would change every stored fallback hash and
split existing baselines in two.
"""

import enum
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pglast
from pglast import ast, enums


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


# -- splitting: PostgreSQL's scanner ------------------------------------------------

_SCAN_COMMENTS: Final = frozenset({"SQL_COMMENT", "C_COMMENT"})
_SEMICOLON: Final = "ASCII_59"
_BACKSLASH: Final = "ASCII_92"
_OPEN_PAREN: Final = "ASCII_40"
_REST: Final = "REST"  # pseudo token: what follows a scanner error (an unterminated literal)


@dataclass(frozen=True, slots=True)
class _Lexeme:
    start: int
    end: int  # exclusive
    name: str


def _scan(text: str) -> list[_Lexeme]:
    """PostgreSQL's scanner; an unscannable tail (unterminated literal) becomes one `REST` token."""
    try:
        return [_Lexeme(t.start, t.end + 1, t.name) for t in pglast.parser.scan(text)]
    except pglast.parser.ParseError as error:
        location = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], int) else 0
        head = _scan(text[:location]) if 0 < location < len(text) else []
        return [*head, _Lexeme(location, len(text), _REST)]


def _is_routine_definition(head: list[str]) -> bool:
    """CREATE [OR REPLACE] FUNCTION|PROCEDURE: its SQL-standard body may hold `;`."""
    if head[:1] != ["CREATE"]:
        return False
    rest = head[3:] if head[1:3] == ["OR", "REPLACE"] else head[1:]
    return bool(rest) and rest[0] in ("FUNCTION", "PROCEDURE")


def split_statements(text: str) -> list[Statement]:
    """Split a workload the way psql would; comment-only pieces are dropped.

    Tokens come from PostgreSQL's own scanner (strings, quoted identifiers,
    dollar quotes, nested comments); `;` ends a statement except inside a
    `BEGIN ATOMIC … END` routine body, and a psql/pgbench backslash command at
    the start of a statement runs to the end of its line.
    """
    statements: list[Statement] = []
    first: _Lexeme | None = None
    last: _Lexeme | None = None
    head: list[str] = []  # token names of the first few significant tokens
    atomic_depth = 0

    def emit(start: int, end: int) -> None:
        line = text.count("\n", 0, start) + 1
        statements.append(Statement(text[start:end], len(statements), line))

    tokens = _scan(text)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.name in _SCAN_COMMENTS:
            continue
        if token.name == _BACKSLASH and first is None:
            newline = text.find("\n", token.start)
            end = len(text) if newline < 0 else newline
            emit(token.start, len(text[:end].rstrip()))
            while i < len(tokens) and tokens[i].start < end:
                i += 1
            continue
        if token.name == _SEMICOLON and atomic_depth == 0:
            if first is not None and last is not None:
                emit(first.start, last.end)
            first = last = None
            head = []
            continue
        first = first or token
        last = token
        if len(head) < 5:
            head.append(token.name)
        if _is_routine_definition(head):
            # psql counts CASE too, since CASE … END would otherwise close the body early.
            if token.name in ("BEGIN_P", "CASE"):
                atomic_depth += 1
            elif token.name == "END_P" and atomic_depth > 0:
                atomic_depth -= 1
    if first is not None and last is not None:
        emit(first.start, last.end)
    return statements


def leading_word(text: str) -> str:
    """The first keyword of a statement, upper case, past opening parentheses; `\\` for a meta-command."""
    for token in _scan(text):
        if token.name in _SCAN_COMMENTS or token.name == _OPEN_PAREN:
            continue
        if token.name == _BACKSLASH:
            return "\\"
        word = text[token.start : token.end]
        return word.upper() if _WORD.fullmatch(word) else ""
    return ""


# -- classification: PostgreSQL's parser ----------------------------------------------


class StatementKind(enum.Enum):
    SELECT = "select"  # read-only query: runs in a READ ONLY transaction
    LOCKING_SELECT = "locking_select"  # SELECT … FOR UPDATE/SHARE: read-write txn, rolled back
    DML = "dml"  # INSERT/UPDATE/DELETE/MERGE (or a WITH that contains one)
    CTAS = "ctas"  # CREATE TABLE AS / SELECT INTO / CREATE MATERIALIZED VIEW AS: plain EXPLAIN only
    DDL = "ddl"  # never executed, never explained
    OTHER = "other"  # utility statements EXPLAIN cannot take, and text that does not parse

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


@dataclass(frozen=True, slots=True, order=True)
class QualifiedName:
    """A function or relation as written: `schema` is None when the name is not qualified."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True, slots=True)
class Classification:
    kind: StatementKind
    verb: str  # the leading keyword, upper case ("" when there is none)
    functions: frozenset[QualifiedName] = frozenset()  # every function call, anywhere in the tree
    relations: frozenset[QualifiedName] = frozenset()  # tables and views referenced (CTE names excluded)
    error: str | None = None  # why the text does not parse as exactly one statement


_DML_NODES: Final = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_CTAS_OBJECTS: Final = frozenset({enums.ObjectType.OBJECT_TABLE, enums.ObjectType.OBJECT_MATVIEW})
_DDL_VERBS: Final = frozenset(
    {"CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "SECURITY", "IMPORT", "REFRESH", "REASSIGN"}
)


def _names(nodes: tuple[ast.Node, ...] | None) -> list[str]:
    return [n.sval for n in nodes or () if isinstance(n, ast.String) and n.sval is not None]


def _function_name(call: ast.FuncCall) -> QualifiedName | None:
    parts = _names(call.funcname)
    if not parts:
        return None
    # catalog.schema.name is legal when catalog is the current database: keep schema and name.
    return QualifiedName(parts[-2] if len(parts) > 1 else None, parts[-1])


def _walk(root: ast.Node | tuple[ast.Node, ...]) -> Iterator[ast.Node]:
    """Every node of a parse tree, the root included (subqueries, CTEs, LATERAL, nested calls)."""
    pending: list[object] = [root]
    while pending:
        item = pending.pop()
        if isinstance(item, tuple):
            pending.extend(item)
        elif isinstance(item, ast.Node):
            yield item
            pending.extend(getattr(item, member) for member in item)


def classify(text: str) -> Classification:
    """What the statement is and what it touches, from PostgreSQL's own parse tree."""
    verb = leading_word(text)
    if verb == "\\":
        return Classification(StatementKind.OTHER, verb)
    try:
        parsed = pglast.parse_sql(text)
    except pglast.parser.ParseError as error:
        return Classification(StatementKind.OTHER, verb, error=str(error.args[0]) if error.args else str(error))
    if not parsed or parsed[0].stmt is None:
        return Classification(StatementKind.OTHER, verb)
    # Several statements: described by the first (auto_explain logs a multi-statement query string
    # whole), touching what any of them touches, and flagged: capture runs one statement at a time.
    problem = f"{len(parsed)} statements where one was expected" if len(parsed) > 1 else None
    root = parsed[0].stmt
    functions: set[QualifiedName] = set()
    relations: set[QualifiedName] = set()
    ctes: set[str] = set()
    modifies = locks = into = False
    for node in _walk(tuple(raw.stmt for raw in parsed if raw.stmt is not None)):
        if isinstance(node, ast.FuncCall):
            if (name := _function_name(node)) is not None:
                functions.add(name)
        elif isinstance(node, ast.RangeVar) and node.relname:
            relations.add(QualifiedName(node.schemaname or None, node.relname))
        elif isinstance(node, ast.CommonTableExpr) and node.ctename:
            ctes.add(node.ctename)
        elif isinstance(node, _DML_NODES):
            modifies = True
        elif isinstance(node, ast.LockingClause):
            locks = True
        elif isinstance(node, ast.IntoClause):
            into = True
    relations = {r for r in relations if r.schema is not None or r.name not in ctes}
    kind = _kind(root, verb, modifies=modifies, locks=locks, into=into)
    return Classification(kind, verb, frozenset(functions), frozenset(relations), problem)


def _kind(root: ast.Node | None, verb: str, *, modifies: bool, locks: bool, into: bool) -> StatementKind:
    if isinstance(root, ast.SelectStmt):
        if modifies:  # WITH x AS (DELETE … RETURNING …) SELECT …
            return StatementKind.DML
        if into:  # SELECT … INTO new_table creates a table
            return StatementKind.CTAS
        return StatementKind.LOCKING_SELECT if locks else StatementKind.SELECT
    if isinstance(root, _DML_NODES):
        return StatementKind.DML
    if isinstance(root, ast.CreateTableAsStmt) and root.objtype in _CTAS_OBJECTS:
        return StatementKind.CTAS
    if verb in _DDL_VERBS:
        return StatementKind.DDL
    return StatementKind.OTHER


def strip_explain(text: str) -> str:
    """`EXPLAIN [ANALYZE] [VERBOSE] | EXPLAIN (…) stmt` → `stmt`; other text unchanged.

    auto_explain logs the plan of an `EXPLAIN ANALYZE …` with the EXPLAIN in its
    query text; the statement inside is what should be classified.
    """
    tokens = [t for t in _scan(text) if t.name not in _SCAN_COMMENTS]
    if not tokens or tokens[0].name != "EXPLAIN":
        return text
    i = 1
    if i < len(tokens) and tokens[i].name == _OPEN_PAREN:
        depth = 0
        while i < len(tokens):
            depth += {_OPEN_PAREN: 1, "ASCII_41": -1}.get(tokens[i].name, 0)
            i += 1
            if depth == 0:
                break
    while i < len(tokens) and tokens[i].name in ("ANALYZE", "ANALYSE", "VERBOSE"):
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
    for token in tokenize(text):
        if token.kind in _INSIGNIFICANT:
            continue
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
