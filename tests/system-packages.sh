#!/usr/bin/env bash
# System packages the tests need (as root): a real Dovecot, Postfix and
# PostgreSQL for tests/test_imap.py, tests/test_postfix.py and the PostgreSQL
# store (tests/pg.py, tests/test_scale_out.py); Prometheus's promtool checks the
# shipped alert rules (tests/test_metrics.py); Chromium and its chromedriver
# open the `gateway report` page headless (tests/test_report.py, through
# selenium). The tests start them as private processes; "No configuration" and
# policy-rc.d keep apt from setting up or starting system instances.
set -euo pipefail
if ! command -v dovecot >/dev/null || ! command -v postfix >/dev/null || ! command -v promtool >/dev/null \
        || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
        || ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd postfix postgresql prometheus \
        chromium chromium-driver >/dev/null
fi
