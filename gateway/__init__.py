"""Email-driven support ticket gateway."""
