"""Choosing the answer language: directory, client headers, the text, the mailbox default."""
from __future__ import annotations

import time
from datetime import UTC, datetime
from datetime import time as clock_time
from types import SimpleNamespace

import pytest

from gateway.rules.language import (
    accept_language_ranges,
    best_accepted,
    choose_language,
    detect_language,
    first_content_language,
    primary,
    target_text,
)
from gateway.rules.settings import Plan, Target
from gateway.rules.sla import BusinessCalendar

GERMAN_MAIL = """Sehr geehrte Damen und Herren,

seit dem Update am Wochenende schlägt unsere nächtliche Sicherung des Exchange-Postfachs fehl.
Im Ereignisprotokoll steht jedes Mal der Fehler 0x80040115. Wir haben den Dienst bereits neu
gestartet, leider ohne Erfolg. Können Sie uns bitte sagen, was wir noch prüfen sollen?

Mit freundlichen Grüßen
Jörg Müller
Müller & Söhne GmbH, Hauptstraße 5, 80331 München
"""

GERMAN_WITH_ENGLISH_LOG = """Hallo zusammen,

unser Backup bricht seit gestern ab. Hier der Auszug aus dem Log:

2026-11-22 02:00:01 ERROR Backup job failed: unable to connect to the storage target
2026-11-22 02:00:01 ERROR The operation was aborted because the target is not reachable
2026-11-22 02:00:02 INFO Retrying in 300 seconds

Könnt ihr euch das bitte ansehen? Danke und viele Grüße
Anna
"""

JAPANESE_MAIL = """サポートご担当者様

お世話になっております。株式会社サンプルの田中です。
昨晩からExchangeのバックアップがエラー0x80040115で失敗しております。
ログを添付いたしますので、ご確認いただけますでしょうか。

2026-11-22 02:00:01 ERROR Backup job failed: unable to connect to the storage target

よろしくお願いいたします。
田中 太郎
"""

ENGLISH_MAIL_WITH_GERMAN_NAMES = """Hi team,

since the weekend our nightly backup fails with error 0x80040115. We have already restarted
the service but it did not help. Could you please tell us what else we should check?

Best regards,
Jörg Müller
Müller & Söhne GmbH, Hauptstraße 5, 80331 München
"""

ENGLISH_MAIL_WITH_JAPANESE_SIGNATURE = """Hello,

our nightly backup has been failing since yesterday with the error below. We have restarted the
service twice and checked the storage, but the problem is still there. Could you help us?

Thanks,
Taro Tanaka
株式会社サンプル (Sample Corporation)
"""

ENGLISH_REPLY_QUOTING_GERMAN = """Thanks, that fixed it. You can close the ticket now.

> Guten Tag, bitte starten Sie den Dienst neu und prüfen Sie, ob die Sicherung
> danach wieder läuft. Wir warten auf Ihre Rückmeldung.
> Mit freundlichen Grüßen, Ihr Support-Team
"""


def choose(text: str = "", *, directory: str | None = None, content: str | None = None,
           accept: str | None = None, default: str = "en") -> tuple[str, str]:
    return choose_language(directory_language=directory, content_language=content,
                           accept_language=accept, text=text, default=default)


@pytest.mark.parametrize(("text", "language"), [
    (GERMAN_MAIL, "de"),
    (GERMAN_WITH_ENGLISH_LOG, "de"),
    (JAPANESE_MAIL, "ja"),
    (ENGLISH_MAIL_WITH_GERMAN_NAMES, "en"),
    (ENGLISH_MAIL_WITH_JAPANESE_SIGNATURE, "en"),
    (ENGLISH_REPLY_QUOTING_GERMAN, "en"),
])
def test_text_of_realistic_mails_decides_without_headers(text: str, language: str) -> None:
    chosen, why = choose(text)
    assert chosen == language, why
    assert why.startswith("text: ")


def test_japanese_mail_with_a_pasted_english_log_is_japanese() -> None:
    detected = detect_language(JAPANESE_MAIL + "\n" + "ERROR Backup job failed: the target is unreachable\n" * 3)
    assert detected.language == "ja"


def test_chinese_without_kana_is_not_taken_for_japanese() -> None:
    chinese = "您好，我们的备份从昨天开始失败，错误代码是0x80040115。请帮我们检查一下。谢谢！"
    assert detect_language(chinese).language is None
    assert choose(chinese, default="en") == ("en", "mailbox default: en (too little text to tell)")


def test_too_little_text_falls_back_to_the_mailbox_default() -> None:
    chosen, why = choose("Backup fails. Log attached.", default="de")
    assert chosen == "de" and why.startswith("mailbox default: de")


def test_evenly_mixed_text_is_not_guessed() -> None:
    mixed = "Hallo, the backup fails. Bitte helfen Sie uns, we need it today. Danke and thanks."
    detected = detect_language(mixed)
    assert detected.language is None and "mixed" in detected.reason
    assert choose(mixed, default="ja")[0] == "ja"


def test_directory_language_wins_over_headers_and_text() -> None:
    assert choose(GERMAN_MAIL, directory="ja", content="de-DE", accept="de") == \
        ("ja", "customer directory: ja")
    assert choose(JAPANESE_MAIL, directory="de-CH")[0] == "de"
    assert choose("", directory="deu")[0] == "de"


def test_unsupported_directory_language_is_skipped_and_said() -> None:
    chosen, why = choose(GERMAN_MAIL, directory="fr")
    assert chosen == "de" and "customer directory's 'fr' is not supported" in why


def test_headers_decide_when_the_text_cannot() -> None:
    assert choose("Backup fails.", content="de-AT") == ("de", "Content-Language 'de-AT'")
    assert choose("Backup fails.", accept="ja-JP, en-US;q=0.5") == ("ja", "Accept-Language 'ja-JP'")
    # Accept-Language (what the reader wants) before Content-Language (what was written)
    assert choose("Backup fails.", content="en-US", accept="de-DE")[0] == "de"


def test_headers_win_over_text_that_is_not_conclusive() -> None:
    # a short English thank-you from a client set up in German: the header decides
    chosen, why = choose("Thanks, that worked.", content="de-DE")
    assert chosen == "de" and why == "Content-Language 'de-DE'"


def test_conclusive_text_overrides_the_mail_clients_locale() -> None:
    # an English Outlook in a German office labels German text en-US
    chosen, why = choose(GERMAN_MAIL, content="en-US", accept="en-US")
    assert chosen == "de"
    assert "over the mail client's Accept-Language 'en-US'" in why
    chosen, why = choose(JAPANESE_MAIL, content="en-US")
    assert chosen == "ja" and "Japanese script" in why


@pytest.mark.parametrize(("value", "expected"), [
    ("de-AT,de;q=0.9,en;q=0.8", ("de", "de-AT")),
    ("fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7, *;q=0.5", ("en", "en;q=0.8")),
    ("en;q=0.2, ja", ("ja", "ja")),
    ("en-US;q=0.5, de-DE;q=0.5", ("en", "en-US;q=0.5")),       # equal weights: the order given
    ("de;q=abc, ja;q=0.5", ("ja", "ja;q=0.5")),                # a broken q-value drops its range
    ("de;q=1.5, en;q=0.1", ("en", "en;q=0.1")),                # so does one out of range
    ("DE_ch", ("de", "DE_ch")),
    ("de;q=0, en;q=0.1", ("en", "en;q=0.1")),                  # q=0: not acceptable
    ("*", None),
    ("fr, es;q=0.9", None),
    ("", None),
])
def test_accept_language_parsing(value: str, expected: tuple[str, str] | None) -> None:
    assert best_accepted(value) == expected


def test_accept_language_ranges_sorted_by_weight() -> None:
    assert accept_language_ranges("da, en-gb;q=0.8, en;q=0.7") == [("da", 1.0), ("en-gb", 0.8), ("en", 0.7)]
    assert accept_language_ranges(" ja ; q=0.3 ,de") == [("de", 1.0), ("ja", 0.3)]


@pytest.mark.parametrize(("value", "expected"), [
    ("de-DE", ("de", "de-DE")),
    ("fr, de", ("de", "de")),
    ("de (Deutsch)", ("de", "de")),
    ("i-klingon", None),
    ("x-unknown", None),
])
def test_content_language_parsing(value: str, expected: tuple[str, str] | None) -> None:
    assert first_content_language(value) == expected


def test_primary_subtags() -> None:
    assert [primary(t) for t in ("de-AT", "JA-jp", "en_GB", "jpn", "ger", "*", "x-foo", "", "12")] == \
        ["de", "ja", "en", "ja", "de", None, None, None, None]


def test_unsupported_default_falls_back_to_english() -> None:
    chosen, why = choose("", default="fr")
    assert chosen == "en" and "'fr' is not supported" in why
    assert choose("", default="de-CH")[0] == "de"


def test_detection_reads_only_the_start_of_a_huge_mail_quickly() -> None:
    huge = GERMAN_MAIL + "x" * 2_000_000          # a pasted blob without blanks
    start = time.perf_counter()
    assert detect_language(huge).language == "de"
    assert time.perf_counter() - start < 0.05


BERLIN = BusinessCalendar(timezone="Europe/Berlin", holiday_country="DE", holiday_subdivision="BY")
DUE = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_the_desk_states_the_target_in_the_tickets_language() -> None:
    from gateway.desk.writer import Desk
    plan = Plan(name="Professional", targets={2: Target(3)})
    config = SimpleNamespace(rules=SimpleNamespace(plans={"Professional": plan}, hours={"EMEA": BERLIN}),
                             answers_dir=None)
    desk = Desk(config, composer=None)  # type: ignore[arg-type]
    for lang in ("en", "de", "ja"):
        ticket = SimpleNamespace(plan="Professional", priority=2, region="EMEA", language=lang, emergency=False,
                                 contact="")
        assert desk.target_text(ticket, DUE) == target_text(lang, Target(3), DUE, BERLIN)  # type: ignore[arg-type]
    assert target_text("en", Target(3), DUE, BERLIN).startswith("within 3 business hours (")


def test_target_text_in_german_and_japanese() -> None:
    de = target_text("de", Target(3), DUE, BERLIN)
    assert de == ("innerhalb von 3 Geschäftsstunden (Mo, Di, Mi, Do, Fr 09:00–17:00 Uhr Europe/Berlin, "
                  "Feiertage DE-BY), spätestens bis Mo., 23. Nov. 2026, 10:00 Uhr CET")
    ja = target_text("ja", Target(3), DUE, BERLIN)
    assert ja.startswith("2026年11月23日（月）10:00 CET（3営業時間以内") and "月・火・水・木・金" in ja
    assert target_text("de", Target(1, around_the_clock=True), DUE, None) == \
        "innerhalb von 1 Stunde rund um die Uhr, spätestens bis Mo., 23. Nov. 2026, 09:00 Uhr UTC"
    tokyo = BusinessCalendar(timezone="Asia/Tokyo", start=clock_time(10), end=clock_time(18))
    assert target_text("ja", Target(2), DUE, tokyo) == (
        "2026年11月23日（月）18:00 JST（2営業時間以内、"
        "営業時間：月・火・水・木・金 10:00〜18:00 Asia/Tokyo、祝日：なし）")
