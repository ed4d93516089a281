"""Mail going out: rendering, outbox sender, transports."""
