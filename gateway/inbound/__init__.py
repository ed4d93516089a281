"""Mail coming in: SMTP/LMTP listener, parsing, intake."""
