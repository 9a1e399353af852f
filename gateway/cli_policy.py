"""`bastion policy`: check a policy file before it goes live."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.clikit import CheckFailed, OnceEachGroup, echo_json
from policy import PolicyError, load_policy

# What `bastion init` writes: one team, deliberately narrow. Deny by default:
# a key whose team is not listed can call nothing.
STARTER_POLICY = """\
# Bastion policy: who may call which model with what. Reference: docs/policy.md.
# Deny by default: a key whose team is not listed here can call nothing.
# Check a change with `bastion policy check FILE`; the gateway picks up a valid
# change by itself (or on SIGHUP) and keeps the old policy if the new one is invalid.
version: 1

teams:
  default:                      # `bastion keys create` puts keys in this team unless --team says otherwise
    models: ["*"]               # names or globs of deployments
    inputs: [text]              # text, image, audio
    stream: true
    reasoning: false            # enable_thinking
    max_tokens: 1024
    over_max_tokens: clamp      # or refuse
    limits:
      per_key: {requests_per_minute: 120, tokens_per_minute: 200000, concurrent: 8}
    content:
      - {detector: card, action: deny}
      - {detector: ssn, action: redact}
"""


@click.group("policy", cls=OnceEachGroup)
def policy_group() -> None:
    """The policy file: who may call which model with what."""


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def policy_check(file: str, as_json: bool) -> None:
    """Validate FILE; exit 1 with the file, line and field of the first error."""
    try:
        policy = load_policy(Path(file))
    except PolicyError as exc:
        if as_json:
            echo_json({"valid": False, "error": str(exc), "line": exc.line, "field": exc.field})
        raise CheckFailed(str(exc)) from None
    summary = {
        "valid": True,
        "file": file,
        "sha256": policy.sha256,
        "teams": sorted(policy.teams),
        "key_overrides": sorted(f"{team}/{key}" for team, key in policy.keys),
    }
    if as_json:
        echo_json(summary)
        return
    click.echo(f"{file}: valid (sha256 {policy.sha256})")
    click.echo(f"teams: {', '.join(summary['teams']) or '(none: every call is denied)'}")
    if summary["key_overrides"]:
        click.echo(f"key overrides: {', '.join(summary['key_overrides'])}")
