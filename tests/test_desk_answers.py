"""Canned answers (`#answer NAME`) and `#help` (issue 20), against a real
`gateway serve` over SMTP, with Thunderbird-, Outlook- and Gmail-shaped
replies (tests/mailclients.py)."""
from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    QUEUES,
    STAFF,
    SUPPORT,
    GatewayProc,
    agent_reply,
    mail,
    settle,
    uniq,
)

CUSTOMER = "ann@customer.example"

ANSWERS = {
    "en/need-logs.txt": "#status pending\n#priority 2\n\nHello,\n\ncould you send us the logs for "
                        "\"{{ subject }}\" ({{ tag_text }}, P{{ ticket.priority }})?\n\n{{ agent }}\n",
    "de/need-logs.txt": "#status pending\n\nGuten Tag,\n\nbitte senden Sie uns die Logs zu {{ tag_text }}.\n",
    "en/solved.txt": "#status resolved\nGlad it works again.\n",
    "en/peek.txt": "{{ ''.__class__.__mro__[1].__subclasses__() }}\n",
    "en/typo.txt": "Hello {{ custmer_name }}\n",
}


def answers_folder(root: Path, files: dict[str, str]) -> Path:
    folder = root / "answers"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def desk(make_gateway: Any, workdir: Path) -> GatewayProc:
    folder = answers_folder(workdir, ANSWERS)
    gw = make_gateway(extra_toml=f'[answers]\nfolder = "{folder}"\n')
    gw.start()
    return gw


def text_of(m: EmailMessage) -> str:
    return m.get_body(("plain",)).get_content()


def html_of(m: EmailMessage) -> str:
    return m.get_body(("html",)).get_content()


def open_ticket(gw: GatewayProc, subject: str | None = None, headers: dict[str, str] | None = None,
                body: str = "Backup fails.") -> tuple[dict[str, Any], EmailMessage]:
    key = subject or uniq("Backup-fails")
    assert gw.send(mail(CUSTOMER, SUPPORT, key, body, headers=headers))[0] == 250
    t = gw.ticket_by_subject(key.split(" <")[0])
    gw.sink.wait_to(CUSTOMER)
    note = next(m for m in gw.sink.wait_to(QUEUES[t["region"]]) if f"#{t['id']}]" in str(m["Subject"]))
    return t, note


@pytest.mark.parametrize("client", ["thunderbird", "outlook", "gmail"])
def test_answer_inserts_the_named_text_with_its_commands(desk: GatewayProc, client: str) -> None:
    t, note = open_ticket(desk, subject=uniq("Backup-job") + " <b>fails</b>")
    assert desk.send(agent_reply(note, "#answer need-logs\nThanks for your patience.", frm=f"Agent Smith <{STAFF}>",
                                 client=client))[0] == 250
    relayed = desk.sink.wait_to(CUSTOMER, count=2)[1]
    body = text_of(relayed)
    assert "could you send us the logs for" in body and f"[Support #{t['id']}]" in body
    assert "P3" in body and "Agent Smith" in body            # rendered before its own #priority applied
    assert body.index("could you send us") < body.index("Thanks for your patience.")
    assert "#status" not in body and "#answer" not in body
    assert "<b>fails</b>" in body and "&lt;b&gt;fails&lt;/b&gt;" in html_of(relayed)   # escaped in HTML
    after = desk.ticket(t["id"])
    assert after["status"] == "pending" and after["priority"] == 2


def test_the_agents_own_commands_win_over_the_answers(desk: GatewayProc) -> None:
    t, note = open_ticket(desk)
    assert desk.send(agent_reply(note, "#priority 4\n#answer need-logs"))[0] == 250
    desk.sink.wait_to(CUSTOMER, count=2)
    assert desk.ticket(t["id"])["priority"] == 4
    t2, note2 = open_ticket(desk)
    assert desk.send(agent_reply(note2, "#answer solved"))[0] == 250
    mails = desk.sink.wait_to(CUSTOMER, count=5)       # 2 acks, the 2 answers, the closure notice
    assert any("Glad it works again." in text_of(m) for m in mails)
    assert desk.ticket(t2["id"])["status"] == "resolved"


def test_answer_is_taken_in_the_tickets_language(desk: GatewayProc) -> None:
    t, note = open_ticket(desk, headers={"Content-Language": "de"},
                          body="Guten Tag, die Sicherung schlägt fehl, bitte helfen Sie uns.")
    assert desk.ticket(t["id"])["decision"]["language"]["value"] == "de"
    assert desk.send(agent_reply(note, "#answer need-logs"))[0] == 250
    relayed = desk.sink.wait_to(CUSTOMER, count=2)[1]
    assert "bitte senden Sie uns die Logs" in text_of(relayed)
    # an answer with no German file is the English one
    assert desk.send(agent_reply(note, "#answer solved"))[0] == 250
    assert any("Glad it works again." in text_of(m) for m in desk.sink.wait_to(CUSTOMER, count=3))


@pytest.mark.parametrize("command, error", [
    ("#answer nosuch", "no such canned answer (known: need-logs, peek, solved, typo)"),
    ("#answer ../secret", "needs the name of a canned answer"),
    ("#answer peek", "could not be rendered: SecurityError"),
    ("#answer typo", "could not be rendered: UndefinedError"),
])
def test_a_bad_answer_sends_nothing_and_tells_the_agent(desk: GatewayProc, command: str, error: str) -> None:
    t, note = open_ticket(desk)
    assert desk.send(agent_reply(note, f"{command}\nSee above."))[0] == 250
    told = text_of(desk.sink.wait_to(STAFF)[0])
    assert error in told, told
    settle(desk)
    assert len(desk.sink.to(CUSTOMER)) == 1
    assert desk.ticket(t["id"])["status"] == "open"


@pytest.mark.parametrize("client", ["thunderbird", "outlook", "gmail"])
def test_help_mails_the_agent_the_commands_and_answers(desk: GatewayProc, client: str) -> None:
    t, note = open_ticket(desk)
    assert desk.send(agent_reply(note, "#help", client=client))[0] == 250
    helped = desk.sink.wait_to(STAFF)[0]
    body = text_of(helped)
    for command in ("#note", "#status", "#priority", "#escalate", "#cc", "#uncc", "#answer NAME", "#help"):
        assert command in body
    assert "#answer need-logs" in body and "#answer solved" in body and "Glad it works again." in body
    assert "(fails: could not be rendered" in body          # a broken one says so
    assert f"#{t['id']}" in str(helped["Subject"])
    # answering the help mail proves the agent, like any mail of ours to staff
    assert desk.send(agent_reply(helped, "#answer solved"))[0] == 250
    assert any("Glad it works again." in text_of(m) for m in desk.sink.wait_to(CUSTOMER, count=3))
    assert desk.ticket(t["id"])["status"] == "resolved"


def test_help_without_answers_configured(gateway: GatewayProc) -> None:
    _, note = open_ticket(gateway)
    assert gateway.send(agent_reply(note, "#help"))[0] == 250
    assert "No canned answers are configured" in text_of(gateway.sink.wait_to(STAFF)[0])
    settle(gateway)
    assert len(gateway.sink.to(CUSTOMER)) == 1


def test_check_config_reports_a_broken_answer(make_gateway: Any, workdir: Path) -> None:
    folder = answers_folder(workdir, {"en/ok.txt": "Fine {{ ticket.id }}", "en/broken.txt": "Hi {% if %}"})
    gw = make_gateway(extra_toml=f'[answers]\nfolder = "{folder}"\n')
    r = gw.cli("check-config")
    assert r.returncode == 78 and "broken.txt" in r.stderr, r.stderr
    missing = make_gateway(extra_toml=f'[answers]\nfolder = "{workdir / "nowhere"}"\n')
    r = missing.cli("check-config")
    assert r.returncode == 78 and "answers.folder" in r.stderr, r.stderr
