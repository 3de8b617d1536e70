#!/usr/bin/env bash
# Install the Debian packages the tests and the demo run as real servers, when missing:
# PostgreSQL (for the Postgres sink) and Prometheus (its promtool checks the chart's rules;
# the monitoring test runs it as a subprocess) and shellcheck (actionlint checks the
# workflow's run: scripts with it). Needs root or passwordless sudo; says so if not.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
{ [ -x /usr/bin/promtool ] && [ -x /usr/bin/prometheus ]; } || missing+=(prometheus)
command -v shellcheck >/dev/null || missing+=(shellcheck)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "error: Debian packages needed: ${missing[*]}; install them as root:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# The tests start their own Prometheus on a free port. The package's service would listen
# on *:9090, the port every process-node pod binds on its own 127.1.x.y address; keep it
# stopped and off where systemd runs (without systemd, nothing starts it).
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  "${sudo[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
