"""Transports hand a rendered message to the world; see base.Transport."""
