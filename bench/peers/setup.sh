#!/usr/bin/env bash
# The peer gateways the benchmark suite compares Bastion with, each in an
# environment of its own under bench/.peers/ (ignored by git), never as a
# project dependency (and Bastion itself with its runtime dependencies only):
#   LiteLLM's proxy  pip install 'litellm[proxy]' into bench/.peers/litellm/
#   Portkey          npm install @portkey-ai/gateway into bench/.peers/portkey/
# Versions are pinned so a run can be repeated; LITELLM_VERSION and
# PORTKEY_VERSION override them.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=.peers
PYTHON=${PYTHON:-python3.11}
LITELLM_VERSION=${LITELLM_VERSION:-}
PORTKEY_VERSION=${PORTKEY_VERSION:-}
mkdir -p "$PEERS"

# Bastion itself as deployed: its runtime dependencies only (the gateway image's
# set), editable so it runs the working tree's code. The project's .venv adds
# the test dependencies, and one of them (pydantic) Litestar loads when present.
if [ ! -f "$PEERS/bastion/.done" ]; then
  "$PYTHON" -m venv "$PEERS/bastion"
  "$PEERS/bastion/bin/pip" install -q --upgrade pip
  "$PEERS/bastion/bin/pip" install -q -e ..
  touch "$PEERS/bastion/.done"
fi

if [ ! -f "$PEERS/litellm/.done" ]; then
  "$PYTHON" -m venv "$PEERS/litellm"
  "$PEERS/litellm/bin/pip" install -q --upgrade pip
  "$PEERS/litellm/bin/pip" install -q "litellm[proxy]${LITELLM_VERSION:+==$LITELLM_VERSION}"
  touch "$PEERS/litellm/.done"
fi
"$PEERS/litellm/bin/python" -c 'import importlib.metadata as m; print("litellm", m.version("litellm"))'

if command -v npm >/dev/null; then
  if [ ! -f "$PEERS/portkey/.done" ]; then
    mkdir -p "$PEERS/portkey"
    (cd "$PEERS/portkey" && npm init -y >/dev/null && npm install --no-audit --no-fund "@portkey-ai/gateway${PORTKEY_VERSION:+@$PORTKEY_VERSION}" >/dev/null)
    touch "$PEERS/portkey/.done"
  fi
  node -e 'console.log("portkey", require("./'"$PEERS"'/portkey/node_modules/@portkey-ai/gateway/package.json").version)'
else
  echo "npm not found: Portkey is skipped" >&2
fi
