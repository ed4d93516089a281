"""The rules stage: where a ticket goes and why (region, GovCloud, priority, plan, targets), its configuration, the SLA calendar, countries and language."""
