"""The rules stage: what kind of ticket a new mail makes (pure).

This first version decides from the mailbox alone: a GovCloud mailbox makes
a GovCloud ticket for the GOVCLOUD queue, anything else the configured
default region and its queue, at the default priority 3 (general).
"""
from __future__ import annotations

from gateway.config import Config, Mailbox
from gateway.model import Classification, ParsedMail

DEFAULT_PRIORITY = 3


def classify(mail: ParsedMail, mailbox: Mailbox, config: Config) -> Classification:
    region = config.default_region
    return Classification(region=region, govcloud=mailbox.govcloud, priority=DEFAULT_PRIORITY,
                          queue="GOVCLOUD" if mailbox.govcloud else region)
