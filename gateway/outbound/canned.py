"""Canned answers (issue 20): named texts staff insert with `#answer NAME`.

A folder (`[answers] folder`) laid out as the templates are:
`<language>/<name>.txt`, English (`en/`) where the ticket's language has no
such file. Each is a Jinja template rendered with the ticket's fields
(`ticket.id`, `ticket.subject`, `ticket.requester`, `ticket.priority`, ...,
`subject`, `tag_text`, `agent`) in a sandbox (jinja2.sandbox: no attribute
of Python's internals, no call of what is unsafe), undefined names an
error: an agent's `#answer` can't reach past the ticket. The text is plain
text: the relayed answer's HTML part escapes it as it escapes every answer.
Its first lines may be commands of its own (`#status pending`), read as an
agent's are.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

from gateway.model import ANSWER_NAME

FALLBACK = "en"


class CannedAnswers:
    def __init__(self, folder: Path | None):
        self.folder = folder
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(folder)) if folder else None, autoescape=False,
            undefined=StrictUndefined, keep_trailing_newline=False, auto_reload=False)
        names = self.env.list_templates(extensions=["txt"]) if folder else []
        # language -> names: read once, as templates are (SIGHUP reads the folder again)
        self._by_language: dict[str, set[str]] = {}
        for name in names:
            language, _, file = name.rpartition("/")
            if language and "/" not in language and ANSWER_NAME.fullmatch(file[:-4]):
                self._by_language.setdefault(language, set()).add(file[:-4])

    def names(self, language: str) -> list[str]:
        """The answers an agent can use on a ticket in `language`, sorted."""
        return sorted(self._by_language.get(language, set()) | self._by_language.get(FALLBACK, set()))

    def render(self, name: str, language: str, context: Mapping[str, Any]) -> str:
        """The answer's text; LookupError for an unknown name, TemplateError when it fails."""
        for lang in dict.fromkeys((language, FALLBACK)):
            if name in self._by_language.get(lang, set()):
                return self.env.get_template(f"{lang}/{name}.txt").render(context).strip()
        raise LookupError(name)

    def problems(self, sample: Mapping[str, Any]) -> list[str]:
        """Every answer rendered once with sample data: what fails, for check-config."""
        if self.folder is None:
            return []
        if not self.folder.is_dir():
            return [f"{self.folder}: no such answers folder"]
        out = []
        for language, names in sorted(self._by_language.items()):
            for name in sorted(names):
                try:
                    self.env.get_template(f"{language}/{name}.txt").render(sample)
                except TemplateSyntaxError as e:
                    out.append(f"{e.filename}:{e.lineno}: {e.message}")
                except (TemplateError, Exception) as e:  # noqa: BLE001 - the answer's failure, reported
                    out.append(f"{self.folder / language / name}.txt: {type(e).__name__}: {e}")
        return out
