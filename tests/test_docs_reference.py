"""The reference docs name everything an operator can set, call or run: every field of the
config models (docs/configuration.md, or the area doc its table of sections names), every
route of the HTTP API (docs/api.md) and every command and option of the CLI (docs/*.md or
README). And the other way: each field a table of docs/configuration.md gives exists, each
route docs/api.md lists is served, and each command and option a doc shows `postlane` run
with exists. Like
tests/test_architecture_doc.py, so the pages cannot drift from the code."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

import typer
from pydantic import BaseModel

from postlane.api.app import create_app
from postlane.api.tokens import Tokens
from postlane.cli import app as cli_app
from postlane.config.model import Config
from tests.conftest import config_text
from tests.test_cli_output import _commands

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REFERENCE = DOCS / "configuration.md"


def _unwrap(annotation: object) -> object:
    while get_origin(annotation) in (Union, UnionType):  # Optional[...]
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def _model(annotation: object) -> type[BaseModel] | None:
    """The model a field holds: itself, or in a dict's values or a list's items."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (dict, list):
        return _model(get_args(annotation)[-1])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, key) of every field, ``pools.NAME.ips[].ehlo`` style, aliases as written."""
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}.{key}" if prefix else key
        yield path, key
        inner = _model(field.annotation)
        if inner is not None:
            origin = get_origin(_unwrap(field.annotation))
            yield from config_keys(inner, path + {dict: ".NAME", list: "[]"}.get(origin, ""))


def area_docs() -> dict[str, set[Path]]:
    """Top-level section -> the docs the reference's "Sections documented with their area"
    table sends the reader to."""
    text = REFERENCE.read_text(encoding="utf-8")
    table = text[text.index("## Sections documented with their area"):]
    areas: dict[str, set[Path]] = {}
    for row in table.splitlines():
        if row.startswith("| `"):
            cells = row.split("|")
            docs = {REPO / d for d in re.findall(r"docs/[\w.-]+\.md", cells[2])}
            for name in re.findall(r"`([^`]+)`", cells[1]):
                areas.setdefault(name.strip("[]").split(".")[0], set()).update(docs)
    return areas


def names_key(text: str, key: str) -> bool:
    """Whether a doc names ``key`` as a config field: in backticks (``key``, ``a.key``,
    ``[a.key]``, ``{ x, key }``, ``[a] key``), or set in a TOML example (``key = ...``)."""
    k = re.escape(key)
    return any(re.search(pattern, text, re.M) for pattern in (
        rf"`(?:[\w.\-\[\]]*\.)?{k}(?:`|\s*=|[,/ .\[])",
        rf"`\[*[\w.\-]*\b{k}(?:\.[A-Z]+)?\]",
        rf"`[^`\n]*[{{,]\s*{k}\b[^`\n]*`",
        rf"`\[[\w.\-]+\] {k}`",
        rf"^\s*\[\[?[\w.\-\"*]*\b{k}\]",
        rf"^\s*{k}\s*=",
        rf"[{{,]\s*{k}\s*="))


def test_every_config_key_is_documented() -> None:
    reference = REFERENCE.read_text(encoding="utf-8")
    areas = area_docs()
    missing = []
    for path, key in config_keys():
        docs = sorted(areas.get(path.split(".")[0], set()))
        text = reference + "".join(d.read_text(encoding="utf-8") for d in docs)
        if not names_key(text, key):
            missing.append((path, [d.name for d in docs] or ["configuration.md"]))
    assert missing == []


def test_each_field_a_reference_table_gives_exists() -> None:
    """The tables under ``## `[section]` `` headings of docs/configuration.md: each row's
    backticked first-cell names are fields of that section's model."""
    text = REFERENCE.read_text(encoding="utf-8")
    wrong = []
    for heading, body in re.findall(r"^## `\[([\w.]+)\]`[^\n]*\n(.*?)(?=^## )", text,
                                    re.M | re.S):
        model: object = Config
        for part in heading.split("."):
            if part in ("NAME", "CLASS"):
                continue
            model = _model(model.model_fields[part].annotation)  # type: ignore[union-attr]
        if model is None:  # [routes]: a table of the operator's own keys
            continue
        fields = {f.alias or n for n, f in model.model_fields.items()}  # type: ignore[union-attr]
        for row in body.splitlines():
            if row.startswith("| `"):
                for name in re.findall(r"`([\w]+)`", row.split("|")[1]):
                    if name not in fields:
                        wrong.append(f"[{heading}] {name}")
    assert wrong == []


def _doc_routes(text: str) -> set[tuple[str, str]]:
    """(METHOD, path) of every route a doc names in backticks: ``GET /a/{x}?q=``; a path
    after a comma (``POST /a``, ``/b``) has the method before it; ``{a\\|b}`` is one or the
    other."""
    routes: set[tuple[str, str]] = set()
    for line in text.splitlines():
        method = None
        for span in re.findall(r"`([^`]+)`", line):
            match = re.match(r"(GET|POST|PUT|PATCH|DELETE) (/\S*)", span)
            if match:
                method, path = match.groups()
            elif method and span.startswith("/"):
                path = span
            else:
                continue
            path = path.split("?")[0]
            for alt in re.findall(r"\{([^}]*\\\|[^}]*)\}", path):
                for one in alt.split("\\|"):
                    routes.add((method, path.replace("{" + alt + "}", one)))
            routes.add((method, path))
    return routes


async def test_every_api_route_is_documented(tmp_path, sink, make_node) -> None:
    node = await make_node(config_text(tmp_path, sink.port))
    api = node.config.api
    app = create_app(node.api.parts, Tokens(api.token_file, api.named_tokens_file()))
    documented = _doc_routes((DOCS / "api.md").read_text(encoding="utf-8"))
    for doc in ("feedback.md", "monitoring.md", "reputation.md"):
        documented |= _doc_routes((DOCS / doc).read_text(encoding="utf-8"))
    # the schema lists every route of the routers the app includes (the dashboard, "/", is
    # left out of it and named in docs/monitoring.md)
    routes = [(method.upper(), path) for path, ops in app.openapi()["paths"].items()
              for method in ops]
    missing = []
    for method, path in routes:
        short = re.sub(r"^/api/v1", "", path)
        pattern = re.sub(r"\\\{[^}]*\\\}", r"\{[^}]*\}", re.escape(short))
        if not any(m == method and re.fullmatch(pattern, p) for m, p in documented):
            missing.append(f"{method} {path}")
    assert len(routes) > 30 and missing == []
    served = [(m, re.sub(r"\\\{[^}]*\\\}", r"[^/]+", re.escape(re.sub(r"^/api/v1", "", p))))
              for m, p in routes]
    unknown = sorted(f"{m} {p}" for m, p in _doc_routes((DOCS / "api.md").read_text())
                     if "\\|" not in p and p != "/openapi.json" and not any(
                         m == method and re.fullmatch(pattern, p) for method, pattern in served))
    assert unknown == []


def test_every_cli_command_and_option_is_documented() -> None:
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))
    text += (REPO / "README.md").read_text(encoding="utf-8")
    missing = []
    for path, cmd in _commands(typer.main.get_command(cli_app)):
        if not re.search(rf"postlane {re.escape(path)}\b", text):
            missing.append(path)
        for param in cmd.params:
            opts = [o for o in [*param.opts, *param.secondary_opts]
                    if o.startswith("-") and o != "--help"]
            if opts and not any(re.search(rf"(?<![\w-]){re.escape(o)}\b", text) for o in opts):
                missing.append(f"{path} {opts[0]}")
    assert missing == []


def _invocations(text: str) -> Iterator[tuple[str, str]]:
    """(words after ``postlane``, the rest of the line) of each command a doc shows run."""
    for line in text.splitlines():
        for match in re.finditer(r"(?:^|[`$(]\s*|&&\s*|\|\s*)postlane ((?:[a-z][\w-]*\s*)+)"
                                 r"([^`#\n]*)", line):
            yield match.group(1), match.group(2)


def test_every_command_and_option_the_docs_show_exists() -> None:
    """A reader copies `postlane queue list -c CFG --older-than 10m` as written: each word
    must name a command and each flag an option of it (usage lines such as
    ``hold|release`` name several and are left to the reader)."""
    root = typer.main.get_command(cli_app)
    wrong = []
    checked = 0
    for doc in [*sorted(DOCS.glob("*.md")), REPO / "README.md"]:
        for words, rest in _invocations(doc.read_text(encoding="utf-8")):
            cmd, path = root, []
            for word in words.split():
                if not hasattr(cmd, "commands") or word not in cmd.commands:
                    break
                cmd, path = cmd.commands[word], [*path, word]
            if hasattr(cmd, "commands"):  # a group: the next word must be one of its commands
                following = words.split()[len(path):]
                if path and following and "|" not in following[0]:
                    wrong.append(f"{doc.name}: postlane {' '.join(path)} {following[0]}")
                continue
            checked += 1
            opts = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
            rest = " ".join(words.split()[len(path):]) + " " + rest
            wrong += [f"{doc.name}: postlane {' '.join(path)} {flag}"
                      for flag in re.findall(r"(?<![\w/-])(--?[a-zA-Z][\w-]*)", rest)
                      if flag not in opts and flag != "--help"]
    assert checked > 200 and wrong == []


#: ```toml blocks that are not config fragments, or not literal ones, and why.
NOT_CONFIG = {
    ("security.md", '[users."claims-app"]'): "the users file, checked by test_security",
    ("dkim.md", "[dkim]"): "`ips = [...]` stands for the pool's addresses",
}


def _merge(into: dict, fragment: dict) -> None:
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def test_every_config_example_in_the_docs_is_valid() -> None:
    """Each ```toml block, set into examples/insurance.toml, validates: a reader who pastes
    it gets no unknown field and no value of the wrong kind."""
    import tomllib

    from pydantic import ValidationError

    from postlane.config.load import _message, _path

    example = (REPO / "examples" / "insurance.toml").read_text(encoding="utf-8")
    wrong = []
    blocks = 0
    for doc in [*sorted(DOCS.glob("*.md")), REPO / "README.md"]:
        for block in re.findall(r"```toml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            if (doc.name, block.split("\n", 1)[0].split("#")[0].strip()) in NOT_CONFIG:
                continue
            blocks += 1
            config = tomllib.loads(example)
            _merge(config, tomllib.loads(block))
            try:
                Config.model_validate(config)
            except ValidationError as exc:
                wrong += [f"{doc.name}: {_path(tuple(e['loc']))}: {_message(e)}"
                          for e in exc.errors()]
    assert blocks > 5 and wrong == []
