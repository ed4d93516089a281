"""Templates: every kind in every language, text and HTML, escaping, operators' overrides, checks."""
from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from gateway.mail.reply import REPLY_MARKER, reply_text
from gateway.model import Kind, Status, Ticket
from gateway.outbound.compose import SAMPLE_CONTEXTS, Composer, check_templates, templates
from gateway.outbound.tokens import TicketTokens

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
LANGUAGES = ("en", "de", "ja")
CUSTOMER_KINDS = ("ack", "staff_reply", "reminder", "autoclose", "closure", "info_request", "redirect",
                  "escalation", "status")
STAFF_KINDS = ("staff_notify", "sla_warning", "forward", "command_error", "process_staff", "staff_unproven")
TEMPLATE_ONLY = {"sla_warning": Kind.STAFF_NOTIFY, "forward": Kind.STAFF_NOTIFY,
                 "command_error": Kind.STAFF_NOTIFY, "process_staff": Kind.STAFF_NOTIFY,
                 "staff_unproven": Kind.STAFF_NOTIFY}
TRANSLATED_MARKER = {"de": "-- Bitte oberhalb dieser Zeile antworten --",
                     "ja": "-- この行より上にご返信ください --"}
# a word each language's customer templates are sure to use
SIGN = {"en": "ticket", "de": "Ticket", "ja": "チケット"}


def ticket(subject: str = "Backup fails", status: Status = Status.OPEN) -> Ticket:
    return Ticket(id=1042, subject=subject, status=status, requester="ann@c.example", cc=(),
                  region="EMEA", govcloud=False, priority=3, mailbox="support@example.com",
                  linked_ticket=None, created_at=NOW)


def render(name: str, language: str, *, composer: Composer | None = None, t: Ticket | None = None,
           context: dict[str, Any] | None = None) -> tuple[EmailMessage, str, str | None]:
    c = composer or Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32))
    kind = TEMPLATE_ONLY.get(name) or Kind(name)
    out = c.compose(kind, ticket=t or ticket(), mailbox="support@example.com", to=["ann@c.example"],
                    answers=["<a@c.example>"], now=NOW, language=language,
                    context=SAMPLE_CONTEXTS[name][0] if context is None else context,
                    template=name if name in TEMPLATE_ONLY else None)
    msg = email.message_from_bytes(out.content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None
    text = plain.get_content().replace("\r\n", "\n")
    assert out.body_text.replace("\r\n", "\n") == text
    return msg, text, html.get_content().replace("\r\n", "\n") if html is not None else None


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", CUSTOMER_KINDS)
def test_customer_mail_renders_in_every_language_as_text_and_html(name: str, language: str) -> None:
    for status in (Status.RESOLVED, Status.CLOSED):        # both branches of closure
        msg, text, html = render(name, language, t=ticket(status=status))
        assert html is not None and msg.get_content_type() == "multipart/alternative"
        assert msg["Content-Language"] == language
        assert "1042" in text and "1042" in html
        assert SIGN[language] in text
        assert f'<html lang="{language}">' in html
        # the reply parser cuts on the English marker: it is a line of its own, first
        lines = text.splitlines()
        assert lines[0] == REPLY_MARKER
        if language != "en":
            assert lines[1] == TRANSLATED_MARKER[language]
            assert TRANSLATED_MARKER[language] in html
        for other in set(LANGUAGES) - {language, "en"}:
            assert TRANSLATED_MARKER[other] not in text


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", STAFF_KINDS)
def test_staff_mail_is_english_in_every_language(name: str, language: str) -> None:
    msg, text, html = render(name, language)
    assert msg["Content-Language"] == "en"
    assert html is not None and '<html lang="en">' in html
    assert "1042" in text and "1042" in html


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_customer_reply_quoting_our_mail_is_cut_at_the_marker(language: str) -> None:
    _, text, _ = render("reminder", language)
    reply = "Here is the log you asked for.\n\n" + text      # top-posted, quote not marked with >
    assert reply_text(reply) == "Here is the log you asked for."


@pytest.mark.parametrize(("language", "phrase"), [
    ("en", "by email, in English."), ("de", "auf Deutsch."), ("ja", "日本語にてメールでご回答いたします"),
])
def test_acknowledgement_says_which_language_support_answers_in(language: str, phrase: str) -> None:
    _, text, html = render("ack", language)
    assert html is not None
    assert phrase in " ".join(text.split()) and phrase in " ".join(html.split())


def test_acknowledgement_can_say_support_answers_in_another_language() -> None:
    context = {**SAMPLE_CONTEXTS["ack"][0], "support_language": "en"}
    assert "auf Englisch" in render("ack", "de", context=context)[1]
    assert "英語にて" in render("ack", "ja", context=context)[1]
    _, text, html = render("ack", "de", context=context)
    assert "antwortet nur auf Englisch und Japanisch" in " ".join(text.split())
    assert html is not None and "antwortet nur auf Englisch und Japanisch" in html
    assert "英語と日本語のみで対応" in render("ack", "ja", context=context)[1]
    assert "answers in English and Japanese only" in " ".join(render("ack", "en", context=context)[1].split())


def test_missing_fields_and_departments_are_translated() -> None:
    ack = {"name": "Ann", "target": None, "missing": ["account_email", "organisation", "contract number"]}
    _, de, _ = render("ack", "de", context=ack)
    assert "die E-Mail-Adresse Ihres Kontos bei uns" in de and "Ihre Organisation (Firmenname)" in de
    assert "  - contract number" in de                          # unknown labels pass through
    _, ja, _ = render("info_request", "ja", context={"missing": ["account_email"]})
    assert "弊社にご登録のアカウントのメールアドレス" in ja and "お客様" in ja
    _, en, _ = render("ack", "en", context=ack)
    assert "the email address of your account with us" in en
    redirect = {"name": "Ann", "department": "billing", "address": "billing@example.com"}
    assert "Rechnungen und Zahlungen" in render("redirect", "de", context=redirect)[1]
    assert "請求・お支払い" in render("redirect", "ja", context=redirect)[1]
    assert "It is a billing question" in render("redirect", "en", context=redirect)[1]


def test_first_response_target_and_linked_ticket_appear() -> None:
    t = replace(ticket(), linked_ticket=1001)
    context = {"name": "Ann", "target": "innerhalb von 3 Geschäftsstunden", "missing": [],
               "follows_up": {"id": 1001, "status": "closed"}}
    _, text, html = render("ack", "de", t=t, context=context)
    assert "Unsere erste Antwort erhalten Sie innerhalb von 3 Geschäftsstunden." in text
    assert "#1001" in text and html is not None and "#1001" in html
    _, text, _ = render("ack", "ja", context={"name": "Ann", "target": None, "missing": []})
    assert "初回回答時間の保証がございません" in text


HOSTILE_SUBJECT = "x\r\nBcc: victim@example.com <script>alert(1)</script>"
HOSTILE_NAME = '<img src=x onerror=alert(1)> "Ann" & co'


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", CUSTOMER_KINDS + STAFF_KINDS)
def test_html_escapes_hostile_subjects_names_and_text(name: str, language: str) -> None:
    context = dict(SAMPLE_CONTEXTS[name][0])
    fields = ("name", "text", "reply_text", "body_text", "sender", "agent")
    hostile: list[str] = [key for key in fields if key in context]
    for key in hostile:
        context[key] = HOSTILE_NAME
    if "errors" in context:
        context["errors"] = [HOSTILE_NAME]
        hostile.append("errors")
    msg, text, html = render(name, language, t=ticket(subject=HOSTILE_SUBJECT), context=context)
    assert html is not None
    assert msg["Bcc"] is None and msg["To"] == "ann@c.example"
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html or name in ("staff_reply", "command_error", "staff_unproven")  # no subject
    if hostile:
        assert "&lt;img src=x onerror=alert(1)&gt; &#34;Ann&#34; &amp; co" in html
        assert HOSTILE_NAME in text        # the text part is text: nothing to escape


def test_japanese_body_is_base64_and_german_quoted_printable_both_decode() -> None:
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32))
    out = c.compose(Kind.ACK, ticket=ticket(subject="バックアップが失敗します"), mailbox="support@example.com",
                    to=["ann@c.example"], answers=[], now=NOW, language="ja", context=SAMPLE_CONTEXTS["ack"][0])
    assert out.content.isascii()
    msg = email.message_from_bytes(out.content, policy=email.policy.default)
    plain = msg.get_body(("plain",))
    assert plain is not None and plain["Content-Transfer-Encoding"] == "base64"
    assert "バックアップが失敗します" in plain.get_content()
    assert msg["Subject"] == "[Support #1042] バックアップが失敗します"
    de = c.compose(Kind.ACK, ticket=ticket(), mailbox="support@example.com", to=["a@c.example"], answers=[],
                   now=NOW, language="de", context=SAMPLE_CONTEXTS["ack"][0])
    assert b"Content-Transfer-Encoding: quoted-printable" in de.content


def test_unsupported_or_regional_language_falls_back_sensibly() -> None:
    assert render("ack", "fr")[0]["Content-Language"] == "en"
    assert render("ack", "de-AT")[0]["Content-Language"] == "de"


# -- operators' templates ------------------------------------------------------

def write(folder: Path, name: str, content: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")


def test_override_folder_wins_and_leaves_the_rest_alone(tmp_path: Path) -> None:
    write(tmp_path, "de/ack.txt", "{{ marker }}\nMoin {{ name }}, Ticket {{ ticket.id }}.\n")
    write(tmp_path, "de/ack.html", "<p>Moin {{ name }}</p>\n")
    write(tmp_path, "en/reminder.txt", "{{ marker }}\nStill there, {{ ticket.requester }}?\n")
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), override_dir=tmp_path)
    _, text, html = render("ack", "de", composer=c, context={"name": "<Ann>", "target": None, "missing": []})
    assert text == f"{REPLY_MARKER}\nMoin <Ann>, Ticket 1042.\n"
    assert html == "<p>Moin &lt;Ann&gt;</p>\n"                 # still autoescaped
    # English ack untouched
    assert "thank you for writing to us" in render("ack", "en", composer=c)[1]
    # a text overridden without its HTML: text only, not the package's HTML with other words
    msg, text, html = render("reminder", "en", composer=c)
    assert "Still there, ann@c.example?" in text and html is None
    assert msg.get_content_type() == "text/plain"
    # German reminder still the package's, with HTML
    assert render("reminder", "de", composer=c)[2] is not None


def test_override_of_html_only_keeps_the_package_text(tmp_path: Path) -> None:
    write(tmp_path, "en/closure.html", "<p>Closed #{{ ticket.id }}</p>\n")
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), override_dir=tmp_path)
    _, text, html = render("closure", "en", composer=c, t=ticket(status=Status.CLOSED))
    assert html == "<p>Closed #1042</p>\n" and "ticket #1042 is closed" in text


def test_override_can_add_a_language_for_staff_mail(tmp_path: Path) -> None:
    write(tmp_path, "de/command_error.txt", "Fehler: {{ errors | join(', ') }}\n")
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), override_dir=tmp_path)
    msg, text, _ = render("command_error", "de", composer=c)
    assert text.startswith("Fehler: unknown command") and msg["Content-Language"] == "de"


def test_override_shared_strings_change_every_template(tmp_path: Path) -> None:
    write(tmp_path, "de/_strings.jinja",
          '{% set marker_de = "-- Bitte über dieser Zeile antworten --" %}'
          '{% set missing_labels = {"account_email": "Ihre Kundennummer"} %}'
          '{% set departments = {} %}{% set language_names = {"de": "Deutsch"} %}')
    c = Composer(ticket_tag="Support", tokens=TicketTokens(b"s" * 32), override_dir=tmp_path)
    _, text, _ = render("ack", "de", composer=c, context={"name": "A", "target": None, "missing": ["account_email"]})
    assert "-- Bitte über dieser Zeile antworten --" in text and "Ihre Kundennummer" in text
    assert check_templates(c) == []


def test_check_templates_passes_for_the_package() -> None:
    assert check_templates(templates()) == []
    assert check_templates(Composer(ticket_tag="Help", tokens=TicketTokens(b"s" * 32))) == []


def test_check_templates_reports_a_broken_override_with_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "en/ack.txt", "{{ marker }}\n\nHello {{ nmae }},\n")            # line 3: a typo
    write(tmp_path, "de/closure.txt", "Hallo\n\n{% if ticket.status == 'resolved' %}\ngelöst\n")  # no endif
    write(tmp_path, "ja/reminder.txt", "{{ marker }}\n{{ name }} 様\n")         # reminders get no name
    problems = check_templates(templates(tmp_path))
    assert f"{tmp_path}/en/ack.txt:3: UndefinedError: 'nmae' is undefined" in problems
    assert any(p.startswith(f"{tmp_path}/de/closure.txt:3: Unexpected end of template") for p in problems)
    assert f"{tmp_path}/ja/reminder.txt:2: UndefinedError: 'name' is undefined" in problems
    assert len(problems) == 3


def test_check_templates_reports_a_missing_folder_and_unused_files(tmp_path: Path) -> None:
    assert check_templates(templates(tmp_path / "nope")) == [f"{tmp_path / 'nope'}: no such template folder"]
    write(tmp_path, "ack.txt", "flat layout\n")
    write(tmp_path, "en/akc.txt", "typo\n")
    problems = check_templates(templates(tmp_path))
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path}/ack.txt: not used: the gateway reads <language>/<kind>.txt")
    assert problems[1].startswith(f"{tmp_path}/en/akc.txt: not used")


def test_env_and_override_dir_are_one_or_the_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Composer(ticket_tag="S", tokens=TicketTokens(b"s" * 32), env=templates(), override_dir=tmp_path)
