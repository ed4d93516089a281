#!/usr/bin/env bash
# System packages the tests need (as root): a real Dovecot and Postfix for
# tests/test_imap.py and tests/test_postfix.py. The tests start them as private
# processes; "No configuration" means no system instance is set up or started.
set -euo pipefail
if ! command -v dovecot >/dev/null || ! command -v postfix >/dev/null; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd postfix >/dev/null
fi
