"""Bastion's gateway: authentication, OpenAI-compatible routes, audit, the CLI."""
