#!/usr/bin/env bash
# Installs what the browser tests (`pytest -m browser`) need: Debian's chromium, driven by the pip package
# playwright through executable_path=/usr/bin/chromium (Playwright never downloads a browser here).
# Idempotent: a second run finds chromium installed and the pinned playwright satisfied, and changes nothing.
# Usage: scripts/install_browser_deps.sh [path/to/python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-.venv/bin/python}"
# playwright 1.64.1 bundles Chromium 156, the major version Debian bookworm-security ships; keep them close
# so the CDP protocol Playwright speaks matches the browser.
PLAYWRIGHT_PIN="playwright==1.64.1"

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
chromium --version

# pip leaves a satisfied pin alone (no download) and replaces any other version.
"$PYTHON" -m pip install --quiet "$PLAYWRIGHT_PIN"
"$PYTHON" -m pip show playwright | grep -i '^version'
