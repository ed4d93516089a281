"""Priority from what customers write (issue 19): a table of phrases in English,
German and Japanese, form lines with and without a colon, and negations, each
through the rules stage's `decide` with the built-in rules."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.model import ParsedMail
from gateway.rules.decision import decide
from gateway.rules.settings import default_rules

NOW = datetime(2026, 3, 3, 9, 0, tzinfo=UTC)
RULES = default_rules()

# (text of the mail's body, expected priority); the subject is neutral
PHRASES: list[tuple[str, int]] = [
    # form lines, with and without a colon
    ("Priority: 1\nThe console does not load.", 1),
    ("Priority 1\nThe console does not load.", 1),
    ("Priority - 2\nThe console is sluggish.", 2),
    ("Severity: Sev 2\nExports take an hour.", 2),
    ("Priority: low\nA typo on the login page.", 4),
    ("Priority: P4\nA typo on the login page.", 4),
    ("Dringlichkeit: 1\nDie Konsole lädt nicht.", 1),
    ("Dringlichkeit 1\nDie Konsole lädt nicht.", 1),
    ("Priorität 2\nDie Konsole ist träge.", 2),
    ("Priorität: hoch\nDie Konsole ist träge.", 2),
    ("Prio: niedrig\nEin Tippfehler auf der Anmeldeseite.", 4),
    ("優先度: 1\nコンソールが表示されません。", 1),
    ("優先度：2\nコンソールの表示に時間がかかります。", 2),
    ("優先度 1\nコンソールが表示されません。", 1),
    ("優先度：低\nログイン画面に誤字があります。", 4),
    ("緊急度：高\nエクスポートに時間がかかります。", 2),
    ("緊急度：低\nログイン画面に誤字があります。", 4),     # the urgency label is no emergency
    # English wording
    ("Our production is down since 6am.", 1),
    ("Complete outage of the backup service.", 1),
    ("This is urgent: no backups run at all.", 1),
    ("Business critical: all restores fail.", 1),
    ("Emergency! The server is down.", 1),
    ("Nothing works after the update.", 1),
    ("We lost data: data loss after the sync.", 1),
    ("Backups are very slow since Monday.", 2),
    ("The dashboard is degraded and sometimes fails.", 2),
    ("Intermittent timeouts on the API.", 2),
    ("How do I add a second administrator?", 4),
    ("Is it possible to export to CSV?", 4),
    ("A question about the documentation.", 4),
    # German wording
    ("Totalausfall seit heute Morgen.", 1),
    ("Die Produktion steht!", 1),
    ("Notfall: der Server ist ausgefallen.", 1),
    ("Kritisch: keine Sicherung läuft mehr.", 1),
    ("Sehr dringend, es geht gar nichts mehr.", 1),
    ("Die Sicherung ist extrem langsam.", 2),
    ("Zeitweise Abbrüche beim Upload.", 2),
    ("Wie kann ich einen zweiten Admin anlegen?", 4),
    ("Ich habe eine Frage zur Anleitung.", 4),
    # Japanese wording
    ("至急対応をお願いします。バックアップが全く動きません。", 1),
    ("本番環境が停止しています。", 1),
    ("サーバーがダウンしています。", 1),
    ("システム障害が発生しています。", 1),
    ("データが消失しました。", 1),
    ("バックアップの処理が遅いです。", 2),
    ("パフォーマンスが低下しています。", 2),
    ("管理者を追加する方法を教えてください。", 4),
    ("CSVにエクスポートすることは可能ですか？", 4),
    # negations: no P1 for what is said not to be the case
    ("There is no outage, but exports are slow.", 2),
    ("Not urgent: how do I change my password?", 4),
    ("This is not critical, just a question about the documentation.", 4),
    ("Kein Ausfall, aber die Konsole ist langsam.", 2),
    ("Nicht dringend: wie kann ich das Passwort ändern?", 4),
    ("Die Produktion steht nicht, aber der Export ist langsam.", 2),
    ("障害ではありませんが、処理が遅いです。", 2),
    ("緊急ではありません。設定の方法を教えてください。", 4),
    # no priority worded: the default
    ("Please change the company name on our account.", 3),
    ("Bitte ändern Sie den Firmennamen.", 3),
    ("会社名の変更をお願いします。", 3),
    # words that look like priority wording and are not
    ("The download of the report fails with error 500.", 3),
    ("レポートのダウンロードでエラーが出ます。", 3),
    ("バックアップを停止する方法を教えてください。", 4),
]


def priority_of(body: str) -> int:
    mail = ParsedMail(sender="kim@customer.example", sender_name="", to=("support@example.com",), cc=(),
                      subject="Support request", date=NOW, date_offset_minutes=None, message_id="<p@test>",
                      in_reply_to=(), references=(), body_text=body, reply_text=body, headers={})
    return decide(mail, mailbox_address="support@example.com", mailbox_govcloud=False, rules=RULES,
                  directory=RULES.directory, now=NOW).priority


def test_the_table_covers_forty_phrases_in_three_languages() -> None:
    assert len(PHRASES) >= 40
    japanese = [t for t, _ in PHRASES if any("\u3040" <= c <= "\u9fff" for c in t)]
    german = [t for t, _ in PHRASES if any(c in t for c in "äöüß") or "Dringlich" in t or "Die " in t]
    assert len(japanese) >= 10 and len(german) >= 10
    assert {p for _, p in PHRASES} == {1, 2, 3, 4}


@pytest.mark.parametrize(("body", "expected"), PHRASES, ids=[t[:40] for t, _ in PHRASES])
def test_priority_from_the_wording(body: str, expected: int) -> None:
    assert priority_of(body) == expected
