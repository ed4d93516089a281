"""Reading one message: parsing, its reply text, automatic mail and bounces, authentication results (pure functions)."""
