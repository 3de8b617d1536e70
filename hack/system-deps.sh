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

# The tests start their own Prometheus and PostgreSQL on free ports. The packages'
# services would not stay out of the way: Prometheus listens on *:9090, the port every
# process-node pod binds on its own 127.1.x.y address. Their maintainer scripts start
# them through invoke-rc.d (or deb-systemd-invoke), which ask /usr/sbin/policy-rc.d
# first; exit 101 means "action forbidden" (Debian's README.policy-rc.d). Install one
# for the duration of apt-get when the host has none, and remove it on any exit; a
# policy the host already has is left alone.
policy_rc_d=/usr/sbin/policy-rc.d
if [ ! -e "${policy_rc_d}" ]; then
  trap '"${sudo[@]}" rm -f "${policy_rc_d}"' EXIT
  printf '#!/bin/sh\n# Written by RelayRL hack/system-deps.sh while it runs apt-get.\nexit 101\n' \
    | "${sudo[@]}" tee "${policy_rc_d}" >/dev/null
  "${sudo[@]}" chmod 755 "${policy_rc_d}"
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Not started above, but enabled where systemd runs: keep it off at the next boot too.
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  "${sudo[@]}" systemctl --quiet disable --now prometheus.service
fi
