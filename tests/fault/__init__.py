"""The fault suite: real processes, real PostgreSQL and a real SMTP server; see RELIABILITY.md."""
