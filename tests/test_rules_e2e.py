"""The rules stage through a running gateway: routing, GovCloud, redirects,
missing information, response targets and SLA warnings, and `explain`."""
from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import GOV, QUEUES, STAFF, SUPPORT, GatewayProc, agent_reply, mail, reply_to, uniq, wait_for

RULES = """
[redirects]
billing = "billing@example.com"
sales = "sales@example.com"

[rules]
default_region = "AMER"
default_plan = "basic"

[rules.govcloud]
domains = ["agency.example.gov"]

[[rules.customer]]
organisation = "Beispiel Maschinenbau GmbH"
domains = ["beispiel-maschinenbau.de"]
region = "EMEA"
plan = "professional"

[[rules.customer]]
organisation = "Around The Clock Inc"
domains = ["atc.example.com"]
region = "AMER"
plan = "advanced"
"""


@pytest.fixture
def ruled(make_gateway: Callable[..., GatewayProc]) -> GatewayProc:
    gw = make_gateway(extra_toml=RULES)
    gw.start()
    return gw


def run_due(gw: GatewayProc, at: datetime) -> dict[str, int]:
    r = gw.cli("run-due", "--now", at.isoformat())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["jobs"]


def test_region_from_the_sender_country_routes_to_that_queue(ruled: GatewayProc) -> None:
    key = uniq("Backup läuft nicht")
    ruled.send(mail("it@kunde.de", SUPPORT, key, "Seit heute Nacht läuft kein Backup."))
    t = ruled.ticket_by_subject(key)
    assert t["region"] == "EMEA"
    ruled.sink.wait_to(QUEUES["EMEA"])
    assert ruled.sink.to(QUEUES["AMER"]) == []


def test_explicit_region_line_beats_the_country(ruled: GatewayProc) -> None:
    key = uniq("Restore")
    ruled.send(mail("it@kunde.de", SUPPORT, key, "Region: APAC\nPlease restore yesterday's backup."))
    assert ruled.ticket_by_subject(key)["region"] == "APAC"
    ruled.sink.wait_to(QUEUES["APAC"])


def test_govcloud_customer_at_the_commercial_mailbox_never_touches_the_commercial_path(
        ruled: GatewayProc) -> None:
    key = uniq("Tenant backup late")
    ruled.send(mail("ops@agency.example.gov", SUPPORT, key, "Our backup is six hours late."))
    t = ruled.ticket_by_subject(key)
    assert t["govcloud"] is True and t["mailbox"] == GOV
    ack = ruled.gov_sink.wait_to("ops@agency.example.gov")[0]
    assert GOV in str(ack["From"])
    ruled.gov_sink.wait_to(QUEUES["GOVCLOUD"])
    # the customer answers the GovCloud ack: still GovCloud only
    ruled.send(reply_to(ack, "ops@agency.example.gov", "Any news?"))
    ruled.gov_sink.wait_to(QUEUES["GOVCLOUD"], count=2)
    assert ruled.sink.messages == []


def test_billing_mail_is_forwarded_and_the_customer_told_where(ruled: GatewayProc) -> None:
    key = uniq("Invoice question")
    m = mail("Carla <carla@shop.example>", SUPPORT, key,
             "Hello, please send me a corrected invoice for November and refund the double payment.")
    ruled.send(m)
    t = ruled.ticket_by_subject(key)
    assert t["status"] == "resolved" and t["redirect"] == "billing"
    forwarded = ruled.sink.wait_to("billing@example.com")[0]
    assert str(forwarded["Reply-To"]) == "carla@shop.example"
    (original,) = list(forwarded.iter_attachments())
    assert original.get_content() == m.as_bytes()
    notice = ruled.sink.wait_to("carla@shop.example")[0]
    text = notice.get_body(("plain",)).get_content()
    assert "billing@example.com" in text and "forwarded" in text
    assert [k["kind"] for k in ruled.ticket(t["id"])["messages"]] == ["customer", "staff_notify", "redirect"]
    # no acknowledgement, and support's queues are not bothered
    assert len(ruled.sink.to("carla@shop.example")) == 1
    assert all(ruled.sink.to(q) == [] for q in QUEUES.values())


def test_a_technical_problem_that_mentions_an_invoice_stays_with_support(ruled: GatewayProc) -> None:
    key = uniq("Export")
    ruled.send(mail("dan@shop.example", SUPPORT, key,
                    "The invoice PDF export crashes with error 500 since the update."))
    t = ruled.ticket_by_subject(key)
    assert t["redirect"] is None and t["status"] == "open"
    assert ruled.sink.to("billing@example.com") == []


def test_acknowledgement_asks_for_exactly_what_is_missing(ruled: GatewayProc) -> None:
    key = uniq("Login")
    ruled.send(mail("eve@shop.example", SUPPORT, key, "I cannot log in.\nOrganisation: Shop Ltd"))
    t = ruled.ticket_by_subject(key)
    assert t["missing"] == ["account_email"]
    text = ruled.sink.wait_to("eve@shop.example")[0].get_body(("plain",)).get_content()
    assert "email address of your account" in text and "organisation (company name)" not in text
    # a directory customer is missing nothing
    key2 = uniq("Login2")
    ruled.send(mail("it@beispiel-maschinenbau.de", SUPPORT, key2, "Login geht nicht."))
    assert ruled.ticket_by_subject(key2)["missing"] == []


WARNING = "first-response target near: SLA warning"
BREACH = "first-response target missed: SLA breach"
COLLEAGUE = "colleague@staff.example.com"


def sla_mails(gw: GatewayProc, to: str, what: str) -> list[str]:
    return [text for m in gw.sink.to(to) if what in (text := m.get_body(("plain",)).get_content())]


def outage(gw: GatewayProc) -> tuple[dict, datetime]:
    """A P1 ticket on the advanced plan (1 hour 24/7), and its first-response due time."""
    key = uniq("Everything down")
    gw.send(mail("noc@atc.example.com", SUPPORT, key, "Total outage, production stopped."))
    t = gw.ticket_by_subject(key)
    return t, datetime.fromisoformat(t["response_due_at"])


def text_of(m: EmailMessage) -> str:
    return m.get_body(("plain",)).get_content()


def staff_note(gw: GatewayProc, tid: int, count: int) -> str:
    """The text of the `count`-th staff notification of ticket `tid` at the AMER queue."""
    def notes() -> list | None:
        found = [m for m in gw.sink.to(QUEUES["AMER"]) if f"#{tid}]" in str(m["Subject"])]
        return found if len(found) >= count else None
    return text_of(wait_for(notes, what=f"{count} staff notifications of #{tid}")[count - 1])


def test_a_reply_that_gives_missing_details_clears_them_and_one_follow_up_asks_for_the_rest(
        ruled: GatewayProc) -> None:
    """Issue 19 (Kaseya, NinjaOne's form): the ack asks for what is missing; a reply
    that gives part of it clears that part, staff see what was given and what is still
    missing, the customer is asked once more for exactly the rest, and only once."""
    key = uniq("Login")
    ruled.send(mail("eve@shop.example", SUPPORT, key, "I cannot log in."))
    t = ruled.ticket_by_subject(key)
    assert t["missing"] == ["account_email", "organisation"]
    (ack,) = ruled.sink.wait_to("eve@shop.example")
    assert "Missing:    account email, organisation" in staff_note(ruled, t["id"], 1)

    ruled.send(reply_to(ack, "eve@shop.example", "Here you are.\nOrganisation: Shop Ltd\n"))
    assert wait_for_missing(ruled, t["id"], ["account_email"])
    note = staff_note(ruled, t["id"], 2)
    assert "INFORMATION SUPPLIED: organisation; still missing: account email" in note
    assert "Missing:    account email" in note
    asked = ruled.sink.wait_to("eve@shop.example", count=2)[1]
    assert "email address of your account" in text_of(asked) and "organisation (company name)" not in text_of(asked)
    assert f"#{t['id']}]" in str(asked["Subject"])

    ruled.send(reply_to(asked, "eve@shop.example", "Sorry, I do not know which address it was."))
    staff_note(ruled, t["id"], 3)
    assert len(ruled.sink.to("eve@shop.example")) == 2           # asked once more only once
    assert ruled.ticket(t["id"])["missing"] == ["account_email"]

    ruled.send(reply_to(asked, "eve@shop.example", "Found it.\nAccount email: eve.admin@shop.example\n"))
    assert wait_for_missing(ruled, t["id"], [])
    assert "nothing required is missing any more" in staff_note(ruled, t["id"], 4)
    events = [e for e in ruled.ticket(t["id"])["events"] if e["rule"].startswith("information_")]
    assert [(e["rule"], e.get("supplied")) for e in events] == [
        ("information_supplied", ["organisation"]), ("information_requested", None),
        ("information_supplied", ["account_email"])]
    assert "Account email: eve.admin@shop.example" in events[2]["why"]


def wait_for_missing(gw: GatewayProc, tid: int, expected: list[str]) -> bool:
    return bool(wait_for(lambda: gw.ticket(tid)["missing"] == expected or None, what=f"missing == {expected}"))


def test_kaseyas_details_and_the_region_can_be_required(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml=RULES.replace('default_plan = "basic"\n', 'default_plan = "basic"\n\n'
                                               '[rules.missing]\nrequired = ["region", "server_url", '
                                               '"product", "version", "steps", "sample_machine"]\n'))
    gw.start()
    key = uniq("Agent offline")
    gw.send(mail("ops@msp.example", SUPPORT, key, "Agents go offline.\nProduct: VSA\nVersion: -\n"
                 "Server URL: none\nSteps: reboot the endpoint\n"))
    t = gw.ticket_by_subject(key)
    assert t["missing"] == ["region", "server_url", "version", "sample_machine"]
    (ack,) = gw.sink.wait_to("ops@msp.example")
    for words in ("the region you signed up in", "the address of your server", "its version",
                  "a machine it happens on"):
        assert words in text_of(ack)
    assert "the module or product" not in text_of(ack)
    gw.send(reply_to(ack, "ops@msp.example", "Region: EMEA\nServer URL: https://vsa.msp.example\n"
                     "Version: 9.5.20\nSample machine: WS-0042\n"))
    assert wait_for_missing(gw, t["id"], [])
    assert len(gw.sink.to("ops@msp.example")) == 1               # nothing left to ask


def test_the_target_can_wait_for_the_missing_details(make_gateway: Callable[..., GatewayProc]) -> None:
    """[rules.missing] pause_target (Kaseya: on hold until the required details arrive):
    no due time while they are missing, so no warning or breach; the target counts
    from the reply that completes them."""
    gw = make_gateway(extra_toml=RULES.replace('default_plan = "basic"\n', 'default_plan = "basic"\n\n'
                                               '[rules.missing]\nrequired = ["product"]\npause_target = true\n'))
    gw.start()
    t, _ = outage_without_due(gw)
    assert t["missing"] == ["product"] and t["response_due_at"] is None and t["waiting_for_information"]
    (ack,) = gw.sink.wait_to("noc@atc.example.com")
    assert "starts when you send us the details below" in text_of(ack)
    assert "no guaranteed first-response time" not in text_of(ack)
    jobs = run_due(gw, datetime.fromisoformat(t["created_at"]) + timedelta(hours=3))
    assert WARNING not in jobs and BREACH not in jobs            # the 1-hour target waits
    gw.send(reply_to(ack, "noc@atc.example.com", "Product: Cloud Backup\n"))
    assert wait_for_missing(gw, t["id"], [])
    now = gw.ticket(t["id"])
    assert not now["waiting_for_information"]
    due = datetime.fromisoformat(now["response_due_at"])
    assert timedelta(minutes=59) <= due - datetime.fromisoformat(t["created_at"]) <= timedelta(minutes=70)
    assert "The first-response target starts now" in staff_note(gw, t["id"], 2)
    assert run_due(gw, due).get(BREACH) == 1


def outage_without_due(gw: GatewayProc) -> tuple[dict, None]:
    key = uniq("Everything down")
    gw.send(mail("noc@atc.example.com", SUPPORT, key, "Total outage, production stopped."))
    return gw.ticket_by_subject(key), None


def test_sla_warning_before_the_target_then_one_breach_notice(ruled: GatewayProc) -> None:
    """Issue 19: the queue hears of a target before it passes ([rules.sla] warn_before,
    default 20 %: 12 minutes before a 1-hour target), once; when it passes, one
    breach notice, and the ticket records the target as missed."""
    t, due = outage(ruled)
    assert (t["plan"], t["priority"]) == ("advanced", 1)
    created = datetime.fromisoformat(t["created_at"])
    assert timedelta(minutes=59) <= due - created <= timedelta(minutes=61)       # P1: 1 hour 24/7
    ack = ruled.sink.wait_to("noc@atc.example.com")[0].get_body(("plain",)).get_content()
    assert "1 hour 24/7" in ack
    warn_at = datetime.fromisoformat(t["sla"]["warn_at"])
    assert warn_at == due - timedelta(minutes=12)
    assert t["sla"] == {"warn_at": t["sla"]["warn_at"], "warned_at": None, "breached_at": None, "outcome": None}

    assert run_due(ruled, warn_at - timedelta(minutes=1)) == {}
    assert run_due(ruled, warn_at + timedelta(minutes=1)) == {WARNING: 1}
    assert run_due(ruled, warn_at + timedelta(minutes=2)) == {}
    assert run_due(ruled, due + timedelta(minutes=1)) == {BREACH: 1}
    assert run_due(ruled, due + timedelta(hours=2)) == {}
    ruled.sink.wait_to(QUEUES["AMER"], count=3)                  # the notification, warning, breach
    (warning,) = sla_mails(ruled, QUEUES["AMER"], "SLA warning")
    assert f"ticket #{t['id']}" in warning and "falls due in 11 minutes" in warning
    (breach,) = sla_mails(ruled, QUEUES["AMER"], "SLA breach")
    assert "has had no first response, and its target" in breach and "has passed." in breach
    sla = ruled.ticket(t["id"])["sla"]
    assert sla["outcome"] == "missed" and sla["warned_at"] and sla["breached_at"]
    # the customer hears nothing of it
    assert not [m for m in ruled.sink.to("noc@atc.example.com") if "SLA" in m.as_string()]
    # a late first answer keeps the record: missed
    note = next(m for m in ruled.sink.to(QUEUES["AMER"]) if "New ticket" in m.get_body(("plain",)).get_content()
                and f"#{t['id']}]" in str(m["Subject"]))
    ruled.send(agent_reply(note, "Sorry for the wait, looking at it."))
    assert ruled.ticket(t["id"])["first_response_at"] is not None
    assert ruled.ticket(t["id"])["sla"]["outcome"] == "missed"


def test_a_scheduler_that_was_down_sends_only_the_breach_notice(ruled: GatewayProc) -> None:
    t, due = outage(ruled)
    assert run_due(ruled, due + timedelta(hours=3)) == {BREACH: 1}
    assert ruled.ticket(t["id"])["sla"]["outcome"] == "missed"
    assert run_due(ruled, due + timedelta(hours=4)) == {}
    assert sla_mails(ruled, QUEUES["AMER"], "SLA warning") == []
    assert len(sla_mails(ruled, QUEUES["AMER"], "SLA breach")) == 1


def test_the_assignee_gets_the_sla_warning_and_breach_too(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml=RULES)
    gw.config.write_text(gw.config.read_text().replace(f'addresses = ["{STAFF}"]',
                                                       f'addresses = ["{STAFF}", "{COLLEAGUE}"]'))
    gw.start()
    t, due = outage(gw)
    note = next(m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"]))
    gw.send(agent_reply(note, f"#assign {COLLEAGUE}"))
    gw.sink.wait_to(COLLEAGUE)                                     # told of the assignment
    assert gw.ticket(t["id"])["owner"] == COLLEAGUE and gw.ticket(t["id"])["first_response_at"] is None
    assert run_due(gw, datetime.fromisoformat(t["sla"]["warn_at"])) == {WARNING: 1}
    assert run_due(gw, due) == {BREACH: 1}
    gw.sink.wait_to(COLLEAGUE, count=3)
    for who in (QUEUES["AMER"], COLLEAGUE):
        (warning,) = sla_mails(gw, who, "SLA warning")
        assert f"Assignee:   {COLLEAGUE}" in warning
        assert len(sla_mails(gw, who, "SLA breach")) == 1


def test_an_answer_in_time_is_recorded_as_met_and_silences_the_warnings(ruled: GatewayProc) -> None:
    t, due = outage(ruled)
    note = next(m for m in ruled.sink.wait_to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"]))
    ruled.send(agent_reply(note, "Looking at it right now."))
    assert ruled.ticket(t["id"])["first_response_at"] is not None
    assert ruled.ticket(t["id"])["sla"]["outcome"] == "met"
    assert run_due(ruled, due - timedelta(minutes=5)) == {}
    assert run_due(ruled, due + timedelta(hours=1)) == {}
    assert not [m for m in ruled.sink.to(QUEUES["AMER"]) if "SLA" in m.get_body(("plain",)).get_content()]
    assert ruled.ticket(t["id"])["sla"]["outcome"] == "met"


@pytest.mark.parametrize(("warn_before", "lead"), [("30m", timedelta(minutes=30)), ("90%", timedelta(minutes=54)),
                                                   ("off", None), ("2h", None)])
def test_warn_before_is_configurable(make_gateway: Callable[..., GatewayProc], warn_before: str,
                                     lead: timedelta | None) -> None:
    """A lead as long as the target ("2h" before a 1-hour target) or "off": no warning, only the breach."""
    gw = make_gateway(extra_toml=RULES + f'\n[rules.sla]\nwarn_before = "{warn_before}"\n')
    gw.start()
    t, due = outage(gw)
    if lead is None:
        assert t["sla"]["warn_at"] is None
        assert run_due(gw, due - timedelta(seconds=1)) == {}
    else:
        assert datetime.fromisoformat(t["sla"]["warn_at"]) == due - lead
        assert run_due(gw, due - lead) == {WARNING: 1}
    assert run_due(gw, due) == {BREACH: 1}


def test_a_bad_warn_before_is_refused_by_key(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml=RULES + '\n[rules.sla]\nwarn_before = "soon"\n')
    r = gw.cli("check-config")
    assert r.returncode != 0 and "rules.sla.warn_before" in r.stderr + r.stdout


def test_business_hours_target_skips_the_weekend(ruled: GatewayProc) -> None:
    """A Professional P1 (3 business hours, Mon-Fri 09-17 Europe/Berlin)."""
    key = uniq("Produktion steht")
    ruled.send(mail("it@beispiel-maschinenbau.de", SUPPORT, key, "Produktion steht, Totalausfall."))
    t = ruled.ticket_by_subject(key)
    due = datetime.fromisoformat(t["response_due_at"]).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
    assert due.weekday() < 5 and 9 <= due.hour <= 17
    ack = ruled.sink.wait_to("it@beispiel-maschinenbau.de")[0].get_body(("plain",)).get_content()
    assert "3 business hours" in ack and "Europe/Berlin" in ack


def test_explain_shows_the_decision_and_writes_nothing(make_gateway: Callable[..., GatewayProc],
                                                       workdir: Path) -> None:
    gw = make_gateway(extra_toml=RULES)            # never started: no store exists
    f = workdir / "m.eml"
    f.write_bytes(mail("ops@agency.example.gov", SUPPORT, "slow restores",
                       "Priority: 2\nRestores are slow.").as_bytes())
    r = gw.cli("explain", str(f), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    d = out["decision"]
    assert d["govcloud"] is True and d["queue"] == "GOVCLOUD" and d["priority"] == 2
    assert any(e["rule"] == "govcloud.domain" for e in d["evidence"])
    human = gw.cli("explain", str(f)).stdout
    assert "govcloud.domain" in human and "evidence" in human
    assert not gw.data_dir.exists()


def test_rules_problems_are_reported_by_key(make_gateway: Callable[..., GatewayProc],
                                            workdir: Path) -> None:
    gw = make_gateway(extra_toml='[rules]\ndefault_region = "MARS"\n')
    r = gw.cli("check-config")
    assert r.returncode == 78 and "rules.default_region" in r.stderr


def test_rules_can_live_in_their_own_file(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway()
    rules = gw.root / "rules.toml"
    rules.write_text('[rules]\ndefault_region = "APAC"\n')
    gw.config.write_text(gw.config.read_text().replace(
        'ticket_tag = "Support"', 'ticket_tag = "Support"\nrules_file = "rules.toml"'))
    assert gw.cli("check-config").returncode == 0
    gw.start()
    key = uniq("where")
    gw.send(mail("x@shop.example", SUPPORT, key, "hello"))
    assert gw.ticket_by_subject(key)["region"] == "APAC"


def test_a_german_customer_is_answered_in_german(ruled: GatewayProc) -> None:
    key = uniq("Sicherung")
    ruled.send(mail("it@kunde.de", SUPPORT, key,
                    "Hallo, seit gestern läuft die Sicherung nicht mehr. Können Sie uns bitte helfen?"))
    t = ruled.ticket_by_subject(key)
    assert t["messages"][0]["kind"] == "customer"
    ack = ruled.sink.wait_to("it@kunde.de")[0]
    assert str(ack["Content-Language"]) == "de"
    text = ack.get_body(("plain",)).get_content()
    assert f"#{t['id']}" in text and "Ticket" in text and "Antwort" in text
    # a Japanese customer in Japanese, an English one in English
    key2 = uniq("バックアップ")
    ruled.send(mail("it@kaisha.co.jp", SUPPORT, key2, "昨日からバックアップが失敗しています。確認をお願いします。"))
    assert str(ruled.sink.wait_to("it@kaisha.co.jp")[0]["Content-Language"]) == "ja"
    key3 = uniq("Backup")
    ruled.send(mail("it@shop.example", SUPPORT, key3, "Our backup has failed since yesterday, please help."))
    assert str(ruled.sink.wait_to("it@shop.example")[0]["Content-Language"]) == "en"


STATUS_PAGES = """
[acknowledgement]

[acknowledgement.status_pages]
AMER = "https://status.example.com/amer"
EMEA = "https://status.example.com/emea"
GOVCLOUD = "https://status.examplegov.com/"
"""


def test_the_acknowledgement_carries_the_policies_guidance(make_gateway: Callable[..., GatewayProc]) -> None:
    """Issue 19: safe-sender advice naming the support domain, the region's status
    page, one ticket per problem, where billing and sales questions go; for a GovCloud
    ticket the GovCloud domain and status page only, and no commercial addresses."""
    gw = make_gateway(extra_toml=RULES + STATUS_PAGES)
    gw.start()
    gw.send(mail("it@kunde.de", SUPPORT, uniq("Backup läuft nicht"), "Seit heute Nacht läuft kein Backup."))
    ack = text_of(gw.sink.wait_to("it@kunde.de")[0])          # EMEA, in German
    assert "nehmen Sie bitte example.com" in ack and "sicherer Absender" in ack
    assert "Dienststatus für Ihre Region: https://status.example.com/emea" in ack
    assert "billing@example.com" in ack and "sales@example.com" in ack
    assert "kein neues" in ack and "status.example.com/amer" not in ack

    gw.send(mail("ops@agency.example.gov", SUPPORT, uniq("Tenant backup late"), "Our backup is late."))
    gov = gw.gov_sink.wait_to("ops@agency.example.gov")[0]
    gov_text = text_of(gov)
    assert "please add examplegov.com" in gov_text and "add example.com" not in gov_text
    assert "https://status.examplegov.com/" in gov_text
    assert "billing@example.com" not in gov_text and "sales@example.com" not in gov_text
    html = gov.get_body(("html",)).get_content()
    assert '<a href="https://status.examplegov.com/">' in html


def test_acknowledgement_parts_can_be_switched_off(make_gateway: Callable[..., GatewayProc]) -> None:
    gw = make_gateway(extra_toml=RULES + STATUS_PAGES.replace("[acknowledgement]",
                                                              '[acknowledgement]\nparts = ["target"]'))
    gw.start()
    gw.send(mail("kim@customer.example", SUPPORT, uniq("Export"), "The export is empty."))
    ack = text_of(gw.sink.wait_to("kim@customer.example")[0])
    assert "no guaranteed first-response time" in ack          # the target part stays
    for gone in ("safe-senders", "status.example.com", "billing@example.com", "What happens next",
                 "don't open a new", "please reply with"):
        assert gone not in ack
    assert "Your ticket number" in ack                           # the ID is always there


def test_a_customer_outside_the_support_languages_is_told_which_they_are(
        make_gateway: Callable[..., GatewayProc]) -> None:
    """Issue 19 (Dropbox: support in English and Japanese only): a German customer
    gets a German acknowledgement that says answers come in English, and staff are
    told to answer in English; customers in a support language are told nothing."""
    gw = make_gateway(extra_toml=RULES + '\n[acknowledgement]\nsupport_languages = ["en", "ja"]\n')
    gw.start()
    key = uniq("Backup läuft nicht")
    gw.send(mail("it@kunde.de", SUPPORT, key, "Hallo, seit heute Nacht läuft kein Backup mehr. Bitte helfen Sie uns."))
    ack = gw.sink.wait_to("it@kunde.de")[0]
    assert str(ack["Content-Language"]) == "de"
    text = text_of(ack)
    assert "antwortet nur auf Englisch und Japanisch" in text and "kommen daher auf Englisch" in text
    assert "per E-Mail auf Englisch" in text                    # the next steps say it too
    assert "antwortet nur auf Englisch und Japanisch" in ack.get_body(("html",)).get_content()
    t = gw.ticket_by_subject(key)
    note = next(n for n in gw.sink.wait_to(QUEUES["EMEA"]) if f"#{t['id']}]" in str(n["Subject"]))
    assert "LANGUAGE: the customer writes German; answer in English (support languages: English, Japanese)" \
        in note.get_body(("plain",)).get_content()

    gw.send(mail("it@kaisha.co.jp", SUPPORT, uniq("バックアップ"), "昨日からバックアップが失敗しています。確認をお願いします。"))
    ja = text_of(gw.sink.wait_to("it@kaisha.co.jp")[0])
    assert "のみで対応しております" not in ja and "日本語にてメールでご回答" in ja
    gw.send(mail("kim@customer.example", SUPPORT, uniq("Export"), "Our export has failed since yesterday, please help."))
    en = text_of(gw.sink.wait_to("kim@customer.example")[0])
    assert "only," not in en and "by email, in English" in en


@pytest.mark.parametrize(("table", "key"), [
    ('parts = ["next_steps", "jokes"]', "acknowledgement.parts"),
    ('support_languages = ["en", "fr"]', "acknowledgement.support_languages"),
    ('support_languages = []', "acknowledgement.support_languages"),
    ('status_pages = { MARS = "https://status.example.com" }', "acknowledgement.status_pages.MARS"),
    ('status_pages = { AMER = "javascript:alert(1)" }', "acknowledgement.status_pages.AMER"),
    ('status_page = {}', "acknowledgement.status_page"),
])
def test_bad_acknowledgement_settings_are_refused_by_key(make_gateway: Callable[..., GatewayProc],
                                                         table: str, key: str) -> None:
    gw = make_gateway(extra_toml=f"\n[acknowledgement]\n{table}\n")
    r = gw.cli("check-config")
    assert r.returncode == 78 and key in r.stderr + r.stdout, r.stderr


def test_category_and_product_from_the_mail_and_from_staff(make_gateway: Callable[..., GatewayProc],
                                                           workdir: Path) -> None:
    """Issue 19: the rules stage sets a category and a product with evidence; staff
    change them with #category / #product; shown in staff mail, tickets show,
    explain and stats."""
    gw = make_gateway(extra_toml=RULES)
    gw.start()
    key = uniq("Restore hangs")
    gw.send(mail("kim@customer.example", SUPPORT, key, "The restore of my mailbox hangs at 80 %.\n"
                 "Product: Cloud Backup for M365\n"))
    t = gw.ticket_by_subject(key)
    assert (t["category"], t["product"]) == ("restore", "Cloud Backup for M365")
    rules = {e["part"]: e["rule"] for e in t["decision"]["evidence"] if e["part"] in ("category", "product")}
    assert rules == {"category": "category.wording", "product": "product.field"}
    note = next(m for m in gw.sink.wait_to(QUEUES["AMER"]) if f"#{t['id']}]" in str(m["Subject"]))
    assert "Category:   restore" in text_of(note) and "Product:    Cloud Backup for M365" in text_of(note)
    # a form line names the category; an alias in another language counts
    key2 = uniq("Zugang")
    gw.send(mail("jo@kunde.de", SUPPORT, key2, "Kategorie: Anmeldung\nIch komme nicht mehr rein."))
    assert gw.ticket_by_subject(key2)["category"] == "login"

    # staff change them; an unknown category is refused, naming the known ones
    gw.send(agent_reply(note, "#category billing-ish"))
    error = wait_for(lambda: [m for m in gw.sink.to(STAFF) if "unknown category" in text_of(m)], what="the error")
    assert "backup, restore, login, performance" in text_of(error[0])
    gw.send(agent_reply(note, "#category Backup\n#product Cloud Backup"))
    wait_for(lambda: gw.ticket(t["id"])["category"] == "backup" or None, what="the new category")
    assert gw.ticket(t["id"])["product"] == "Cloud Backup"
    classified = [(e["part"], e["old"], e["new"]) for e in gw.ticket(t["id"])["events"] if e["rule"] == "classified"]
    assert classified == [("category", "restore", "backup"), ("product", "Cloud Backup for M365", "Cloud Backup")]
    s = json.loads(gw.cli("stats", "--json").stdout)
    assert s["by_category"]["backup"]["opened"] == 1 and s["by_category"]["login"]["opened"] == 1
    assert s["by_product"]["Cloud Backup"]["opened"] == 1

    f = workdir / "m.eml"
    f.write_bytes(mail("kim@customer.example", SUPPORT, "Sicherung", "Die Datensicherung läuft nicht.").as_bytes())
    out = json.loads(gw.cli("explain", str(f), "--json").stdout)
    d = out["decision"]
    assert d["category"] == "backup" and any(e["rule"] == "category.wording" for e in d["evidence"])
